"""The GPU gating benchmark's logic, run on the CPU through Triton's interpreter (--dry-run)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_gating_gpu_dry_run(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_gating_gpu.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, script, "--dry-run", "--E", "8", "--k", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "gating_gpu_dryrun_cpu_interpreter.md").read_text()
    assert "| 8 | 2 |" in md and "| yes |" in md  # Triton table == torch table
    assert (tmp_path / "gating_gpu_dryrun_cpu_interpreter.csv").exists()
