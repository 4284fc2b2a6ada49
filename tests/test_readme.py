"""The README is executable: every `bash` block of it (and the docstring commands of examples/*.py) runs,
in order, as a user would paste it, on tiny sizes, so a README command that breaks fails CI.

What is changed before running, and only this: step counts and sizes shrink (SHRINK), `moefx` is this
checkout's CLI, and the files a block names without making (plan.toml, mos.toml) are written first
from the README's own [parallel] example. The setup block (the first) is what CI itself runs. A line
that needs a second machine is skipped here and named in SKIP, with the test that covers it.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRINK = [
    (r"--steps \d+", "--steps 2"),
    (r"--checkpoint-every \d+", "--checkpoint-every 1"),
    (r"--eval-every \d+", "--eval-every 1"),
    (r"--warmup \d+", "--warmup 1"),
    (r"--batch \d+ --seq \d+", "--batch 2 --seq 16"),
    (r"--max-new-tokens \d+", "--max-new-tokens 4"),
    (r"--reps \d+", "--reps 2"),
    (r"step0000\d\d\d", "step0000002"),
    (r"\{(\w+),[\w,]+\}", r"\1"),                   # one of the alternatives a line lists
]
SKIP = {"--nnodes 2": "needs the other node (tests/runtime/test_launch_cli.py::test_two_nodes_on_one_host_check)"}


def bash_blocks(text: str) -> list[str]:
    """The contents of the README's ```bash blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def runnable(block: str) -> str:
    """The block as this test runs it (see the module docstring)."""
    lines = []
    for line in block.splitlines():
        if any(marker in line for marker in SKIP):
            continue
        for pattern, repl in SHRINK:
            line = re.sub(pattern, repl, line)
        lines.append(line)
    return "\n".join(lines) + "\n"


BLOCKS = bash_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_its_blocks_and_the_shrinking_applies():
    assert len(BLOCKS) >= 4 and "pip install" in BLOCKS[0]
    assert runnable("moefx train x --steps 300 --batch 8 --seq 128 # c\n") == "moefx train x --steps 2 --batch 2 " \
                                                                          "--seq 16 # c\n"
    assert runnable("moefx dump --format {code,table,svg}\n") == "moefx dump --format code\n"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    plans = ROOT / "examples" / "plans"
    # the README's [parallel] example, and its distillation plan (mos.toml: [moe] [student] [parallel])
    (tmp_path / "plan.toml").write_text((plans / "tiny_pr_moe.toml").read_text()
                                        + "\n[parallel]\nnodes = 2\ndevices_per_node = 2\nep = \"auto\"\n")
    (tmp_path / "mos.toml").write_text((plans / "tiny_pr_mos.toml").read_text()
                                       + "\n[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "moefx").write_text(f"#!/bin/sh\nexec {sys.executable} -m moefx.cli \"$@\"\n")
    (bin_dir / "moefx").chmod(0o755)
    return tmp_path


@pytest.mark.dist
def test_the_readme_blocks_run_in_order(workdir):
    """Block after block in one folder, as a reader pastes them (a later block reads the checkpoints
    an earlier one wrote); a command line that repeats an earlier one runs once."""
    seen: set[str] = set()
    env = {**os.environ, "PATH": f"{workdir / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    for index, block in enumerate(BLOCKS[1:], start=1):
        lines = []
        for line in runnable(block).splitlines():
            if line.startswith("moefx ") and line in seen:
                continue
            seen.add(line)
            lines.append(line)
        script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
        r = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (f"README bash block {index} failed:\n{script}\n--- stdout ---\n{r.stdout[-3000:]}"
                                   f"\n--- stderr ---\n{r.stderr[-3000:]}")


def test_the_examples_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for script in sorted((ROOT / "examples").glob("*.py")):
        for command in re.findall(r"^\s+(python examples/\S+\.py.*?)(?:\s+#.*)?$", script.read_text(), re.M):
            argv = [sys.executable, *command.split()[1:]]
            r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
