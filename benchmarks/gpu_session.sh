#!/usr/bin/env bash
# One device session (under 8 minutes on one H100): Triton kernels on the GPU (tests), the gating
# benchmark, decode and bf16 training against the dense model (bench_gpu_session.py), single-GPU
# latency. Run from the repository root on a CUDA machine; results land in benchmarks/results/ (and $OUT).
#   bash benchmarks/gpu_session.sh            # on the GPU
#   bash benchmarks/gpu_session.sh --dry-run  # the benchmarks' logic on the CPU (Triton's interpreter)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "${1:-}" = "--dry-run" ]; then
  export TRITON_INTERPRET=1
  OUT=${OUT:-$(mktemp -d)}                   # a dry run's numbers are not results
  python3 benchmarks/bench_gating_gpu.py --dry-run --E 8 --k 2 --out "$OUT" | tail -5 &&
    python3 benchmarks/bench_gpu_session.py --dry-run --out "$OUT" | tail -16
  exit $?
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 90 python3 -m pytest tests/kernels tests/test_routing.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
timeout 240 python3 benchmarks/bench_gpu_session.py --out "$OUT" 2>&1 | tee "$OUT/gpu_session.log" | tail -20
timeout 60 python3 benchmarks/bench_gating_gpu.py 2>&1 | tee "$OUT/gating_gpu.log" | tail -30
timeout 60 python3 benchmarks/bench_latency_gpu.py --out "$OUT/latency_gpu.md" 2>&1 | tail -14
cp benchmarks/results/gating_gpu_* "$OUT/" 2>/dev/null || true
