#!/usr/bin/env bash
# One device session: Triton kernels on the GPU (tests), gating benchmark, single-GPU latency.
# Run from the repository root on a CUDA machine; results land in benchmarks/results/ (and $OUT).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/kernels tests/test_routing.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
python3 benchmarks/bench_gating_gpu.py 2>&1 | tee "$OUT/gating_gpu.log" | tail -30
python3 benchmarks/bench_latency_gpu.py --out "$OUT/latency_gpu.md" 2>&1 | tail -14
cp benchmarks/results/gating_gpu_* "$OUT/" 2>/dev/null || true
