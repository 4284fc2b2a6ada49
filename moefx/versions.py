"""The versions of moefx and the libraries it runs on, as recorded in both persistent forms."""
from __future__ import annotations

from importlib import metadata

__all__ = ["library_versions"]

_LIBRARIES = ("moefx", "torch", "triton", "transformers", "safetensors")


def library_versions() -> dict[str, str | None]:
    """{distribution name: installed version, or None when it is not installed} (no library is imported)."""
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
