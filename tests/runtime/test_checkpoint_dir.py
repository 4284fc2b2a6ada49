"""A checkpoint folder keeps what it publishes complete: one live writer per --checkpoint-dir (two real
processes race for it), a unique temporary folder per save, nothing left behind by a failed save, and
a full disk named as such before or during the write."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moefx.errors import CheckpointError

STEPS = ["--steps", "100000", "--checkpoint-every", "2", "--batch", "1", "--seq", "8", "--no-progress"]


def _train(ckpt: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moefx.cli", "train", "llama-tiny", "--checkpoint-dir", str(ckpt),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_a_second_run_on_a_live_checkpoint_dir_is_refused_and_published_steps_stay_complete(tmp_path):
    ckpt = tmp_path / "ck"
    first = _train(ckpt, *STEPS)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list(ckpt.glob("step*")):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        assert f"pid {first.pid}" in (ckpt / ".moefx-lock").read_text()
        second = _train(ckpt, "--steps", "2", "--no-progress")
        out, err = second.communicate(timeout=180)
        assert second.returncode != 0
        assert f"is in use by another running moefx job (pid {first.pid}" in err and "another --checkpoint-dir" in err
        assert first.poll() is None                               # the owner was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)                         # maybe in the middle of a save
        first.communicate(timeout=60)
    published = [p for p in ckpt.glob("step*")]
    assert published and all((p / ".metadata").exists() and (p / "moefx.json").exists() for p in published)
    # the lock died with its owner: a new run takes the folder and clears what the killed save left
    last = max(published)
    third = _train(ckpt, "--steps", str(int(last.name[4:]) + 1), "--resume", str(ckpt), "--no-progress",
                   "--checkpoint-every", "1", "--batch", "1", "--seq", "8")
    out, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-3000:]
    assert not [p.name for p in ckpt.iterdir() if ".moefx-tmp-" in p.name]


def _model():
    import moefx
    from moefx.models import load_model

    model, inputs = load_model("gpt2-tiny")
    return moefx.convert(model, None, inputs)


def test_a_full_disk_is_named_before_writing_and_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from moefx.dist import checkpoint as C
    from moefx.fileio import free_bytes

    gm = _model()
    path = tmp_path / "step1"
    C.save_sharded(gm, path)                                       # the previous checkpoint, kept intact
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(C, "free_bytes", lambda p: 1000)
    with pytest.raises(CheckpointError, match=r"no space left for checkpoint .*step1.*MiB free"):
        C.save_sharded(gm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # refused before any byte was written

    # the disk fills up during the write: DCP's serialiser reports a position mismatch, moefx names the cause
    free = iter([free_bytes(tmp_path), 1000])
    monkeypatch.setattr(C, "free_bytes", lambda p: next(free))

    def fails_midway(state, storage_writer, **kw):
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(C.dcp, "save", fails_midway)
    with pytest.raises(CheckpointError, match=r"no space left for checkpoint .*unexpected pos 704"):
        C.save_sharded(gm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # the partial folder is gone
    monkeypatch.undo()
    C.load_full(gm, path)                                           # the previous checkpoint still loads


def test_a_stopped_training_launch_names_its_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch):
    from moefx.cli.launch import _stopped
    from moefx.dist.checkpoint import save_sharded

    argv = ["moefx", "launch", "--plan", "p.toml", "llama-tiny", "--train", "--checkpoint-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    job = ["llama-tiny", "--plan", "p.toml", "--checkpoint-dir", str(tmp_path)]
    assert _stopped(130, job).endswith(f"--checkpoint-dir {tmp_path} has no complete checkpoint yet")
    gm = _model()
    for step in (2, 4):
        save_sharded(gm, tmp_path / f"step{step:07d}")
    text = _stopped(143, job)
    assert text.startswith("moefx launch: stopped (SIGTERM)")
    assert f"the last complete checkpoint is {tmp_path / 'step0000004'}" in text
    assert text.endswith(" ".join(argv) + f" --resume {tmp_path}")
