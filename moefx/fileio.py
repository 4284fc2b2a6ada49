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
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["write_atomic", "atomic_file", "publish_folder", "resolve_folder"]


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
