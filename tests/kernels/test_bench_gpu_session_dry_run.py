"""The GPU session on the CPU (`gpu_session.sh --dry-run`): both benchmarks' logic runs, Triton gating
through Triton's interpreter, and the session's results file has every row."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_gpu_session_dry_run(tmp_path):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")   # its python3 is ours
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_session.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": path, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu_session_dry_run.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| decode step") or line.startswith("| training")]
    assert len(rows) == 2 * 3 + 4, text
    assert int(re.search(r"kernel launches seen from Python \(CUDA-graph replays are not counted\): (\d+)",
                         text).group(1)) > 0
    # the two gatings compute the same decode logits
    assert all(float(m) < 1e-4 for m in re.findall(r"max\|diff\| ([0-9.e+-]+)", text)), text
    # the gating benchmark: Triton's tables equal the torch path's
    md = (tmp_path / "gating_gpu_dryrun_cpu_interpreter.md").read_text()
    assert "| 8 | 2 |" in md and "| yes |" in md
    assert (tmp_path / "gating_gpu_dryrun_cpu_interpreter.csv").exists()
