"""Atomic writes, for the whole package: readers see the old content or the new one, never half.

- `write_atomic(path, data)`: a file's bytes or text;
- `atomic_file(path)`: a context manager yielding a temporary path in the same folder, renamed
  onto `path` when the block succeeds (for torch.save and other writers that want a path);
- `publish_folder(tmp, path)`: make the finished folder `tmp` the content of `path`. `path` is a
  symlink to a versioned sibling folder, swapped by one atomic rename, so at every instant
  `path` names a complete folder (the previous one until the swap, the new one after it).

New files get the permissions the user's umask gives (mkstemp's 0600 would hide them).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from .errors import MoefxError

__all__ = ["write_atomic", "atomic_file", "publish_folder", "resolve_folder", "FolderBusy", "own_folder",
           "free_bytes", "check_writable"]


class FolderBusy(RuntimeError):
    """Another live process owns the folder (`own_folder`)."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`,
    on failure deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)


def resolve_folder(path: str | os.PathLike) -> Path:
    """The folder `path` names now (following the symlink `publish_folder` maintains)."""
    return Path(os.path.realpath(path))


def publish_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the complete folder `tmp` what `path` names, atomically; returns the versioned folder.

    `path` becomes (or stays) a symlink to `.<name>.v-<id>` beside it; the swap is one rename of
    a new symlink over the old one, so `path` always names a complete folder. The previous
    version is deleted after the swap. A real folder at `path` (from an older moefx) is moved
    to a versioned name first."""
    tmp, path = Path(tmp), Path(path)
    version = path.parent / f".{path.name}.v-{uuid.uuid4().hex[:12]}"
    os.replace(tmp, version)
    old = None
    if path.is_symlink():
        old = resolve_folder(path)
    elif path.exists():                     # a plain folder: keep it valid until the symlink replaces it
        old = path.parent / f".{path.name}.v-{uuid.uuid4().hex[:12]}"
        os.replace(path, old)
    link = path.parent / f".{path.name}.link-{uuid.uuid4().hex[:12]}"
    os.symlink(version.name, link)
    os.replace(link, path)
    _fsync_dir(path.parent)
    if old is not None and old.exists() and old != version:
        shutil.rmtree(old, ignore_errors=True)
    return version


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


LOCK_NAME = ".moefx-lock"


@contextlib.contextmanager
def own_folder(folder: str | os.PathLike):
    """Hold an exclusive lock on `folder` (created if missing) while the block runs: one writer per
    folder. The lock is an flock on `<folder>/.moefx-lock`, which holds the owner's pid and command;
    the kernel drops it when the owner exits, however it exits, so no stale lock outlives a crash.
    Raises FolderBusy naming the owner when another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise FolderBusy(f"{folder} is in use by another running moefx job ({owner})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode(), 0)
        yield folder
    finally:
        os.close(fd)                       # closing the descriptor releases the flock


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """MoefxError naming `what` (e.g. "--metrics-csv") when `path` cannot be written: a file, or with
    folder=True a folder. Creates the (parent) folder when missing and writes and removes a probe file
    there, so a run finds out before its first step, not after its last."""
    target = Path(path) if folder else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target, prefix=".moefx-probe-")
        os.close(fd)
        os.unlink(probe)
        if not folder and Path(path).exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        raise MoefxError(f"{what} {path}: cannot write there ({e.strerror or e}); choose a writable path") from None
