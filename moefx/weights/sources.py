"""Where a rank's tensors come from: the dense model's weights, read piece by piece.

A source answers `read(name, narrow)`: the dense tensor `name`, narrowed by `narrow` ({dim: (lo,
hi)}), as a CPU tensor. Materialisation asks each source only for the slices a rank holds, so no
process needs the whole model:

- `SafetensorsSource(folder)`: a Hugging Face checkpoint folder (`model.safetensors`, or shards
  with `model.safetensors.index.json`), read lazily with `safe_open(...).get_slice`: only the
  bytes of the requested slice are read;
- `StateDictSource(path)`: a `torch.save`d state dict, memory-mapped (`torch.load(mmap=True)`);
- `ModuleSource(model)`: an in-memory module's tensors (a small dense model built on the rank);
- `SeededSource(shapes)`: no weights at all: every tensor from its own generator (seeded by its
  name), matrices N(0, 0.02), 1-D weights ones, biases zeros (for plans larger than any machine);
- `ZerosSource(shapes)`: zeros (a KV cache: only the requested slice is allocated);
- `PrefixedSource(source, "model.")` answers for another source's tensors under a prefix too (a
  model wrapped in a module, as the generation graphs wrap the LM), `ChainSource(a, b)` asks a,
  then b.

Every source knows the aliases of tied tensors (GPT-2's `lm_head.weight` is `transformer.wte.weight`)
through `aliases` ({name: [other names of the same tensor]}).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..errors import MoefxError
from ..recipes import seeded

__all__ = ["SourceError", "Source", "SafetensorsSource", "check_safetensors", "StateDictSource", "ModuleSource",
           "SeededSource", "ZerosSource", "PrefixedSource", "ChainSource", "narrowed"]


class SourceError(MoefxError, KeyError):
    """A tensor the rank needs is not in its source."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def narrowed(t: torch.Tensor, narrow: dict | None) -> torch.Tensor:
    """`t` narrowed by {dim: (lo, hi)}."""
    for d, (lo, hi) in (narrow or {}).items():
        t = t.narrow(d, lo, hi - lo)
    return t


class Source:
    """A source of dense tensors by name (see the module docstring)."""

    aliases: dict[str, list[str]]

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        raise NotImplementedError

    def resolve(self, name: str) -> str:
        """The name under which the source holds tensor `name` (itself, or a tied alias)."""
        have = self._names()
        if name in have:
            return name
        for other in self.aliases.get(name, ()):
            if other in have:
                return other
        raise SourceError(f"tensor {name!r} is not in {self.describe()} (nor any tensor tied to it: "
                          f"{self.aliases.get(name, [])}); is this the weights folder of the same model?")

    def read(self, name: str, narrow: dict | None = None) -> torch.Tensor:
        """Tensor `name` narrowed by `narrow`, on the CPU."""
        return self._read(self.resolve(name), dict(narrow or {}))

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor `name`."""
        return self._shape(self.resolve(name))

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, {}).shape)

    def _names(self) -> set:
        cached = getattr(self, "_name_set", None)
        if cached is None:
            cached = self._name_set = set(self.names())
        return cached

    def describe(self) -> str:
        return type(self).__name__


def _opened(path: Path):
    """safe_open(path), or a SourceError naming the file when it is not a readable safetensors file
    (truncated by an interrupted download or copy, or not safetensors at all)."""
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise SourceError(f"{str(path)!r} is missing: the folder's index names it") from None
    except Exception as e:      # safetensors raises its own SafetensorError (no common base but Exception)
        raise SourceError(f"{str(path)!r} is not a readable safetensors file ({e}): it may be truncated; copy or "
                          "download it again") from None


def check_safetensors(folder: str | os.PathLike) -> None:
    """SourceError naming the file when a *.safetensors file of `folder` is truncated or damaged
    (safetensors checks each header and that the file holds every byte it describes; no data is read)."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with _opened(f):
            pass


class SafetensorsSource(Source):
    """A folder with `model.safetensors` or an index of shards (what `save_pretrained` writes)."""

    def __init__(self, folder: str | os.PathLike, aliases: dict | None = None):
        self.folder = Path(folder)
        self.aliases = dict(aliases or {})
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise SourceError(f"{str(self.folder)!r} has no *.safetensors file (nor model.safetensors.index.json): "
                                  "give a folder written by save_pretrained")
            weight_map = {}
            for f in files:
                with _opened(f) as fh:
                    for k in fh.keys():
                        weight_map[k] = f.name
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def names(self):
        return self.weight_map.keys()

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            h = self._handles[file] = _opened(self.folder / file)
        return h

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        sl = self._handle(self.weight_map[name]).get_slice(name)
        shape = sl.get_shape()
        index = tuple(slice(*narrow[d]) if d in narrow else slice(None) for d in range(len(shape)))
        return sl[index] if shape else sl[:]

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def describe(self) -> str:
        return f"the safetensors folder {str(self.folder)!r}"


class StateDictSource(Source):
    """A `torch.save`d state dict file, memory-mapped (only the pages of the slices read are loaded)."""

    def __init__(self, path: str | os.PathLike, aliases: dict | None = None):
        self.path = str(path)
        self.state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        self.aliases = dict(aliases or {})

    def names(self):
        return self.state.keys()

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        return narrowed(self.state[name], narrow)

    def describe(self) -> str:
        return f"the state dict {self.path!r}"


class ModuleSource(Source):
    """The tensors of an in-memory module: parameters and buffers, non-persistent ones included."""

    def __init__(self, module: torch.nn.Module, aliases: dict | None = None):
        self.state = dict(module.named_parameters(remove_duplicate=False))
        self.state.update(module.named_buffers(remove_duplicate=False))
        self.aliases = dict(aliases or {})

    def names(self):
        return self.state.keys()

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        return narrowed(self.state[name].detach(), narrow)

    def describe(self) -> str:
        return "the in-memory dense model"


class SeededSource(Source):
    """Weights from nowhere: tensor `name` of `shapes[name]` drawn from a generator seeded by (seed, name).

    Matrices (and embeddings) N(0, std), 1-D tensors whose name ends in "bias" zeros, other 1-D
    tensors ones (norm weights). Deterministic per tensor, so every rank draws the same values for
    the same tensor, and a narrow is the same slice of the same draw."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, std: float = 0.02,
                 dtypes: dict | None = None, aliases: dict | None = None):
        self.shapes, self.seed, self.std = dict(shapes), seed, std
        self.dtypes = dict(dtypes or {})
        self.aliases = dict(aliases or {})

    def names(self):
        return self.shapes.keys()

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        shape = self.shapes[name]
        dtype = self.dtypes.get(name, torch.float32)
        if not dtype.is_floating_point:
            raise SourceError(f"tensor {name!r} ({dtype}) has no seeded init: integer tensors need a weights source")
        if len(shape) >= 2:
            rows = narrow.get(0, (0, shape[0]))
            # one generator per row: a narrow of dim 0 draws only its rows
            out = torch.empty((rows[1] - rows[0], *shape[1:]), dtype=torch.float32)
            for i, r in enumerate(range(*rows)):
                out[i].normal_(0.0, self.std, generator=seeded("seeded-init", self.seed, name, r))
            return narrowed(out, {d: v for d, v in narrow.items() if d != 0}).to(dtype)
        value = torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
        return narrowed(value, narrow).to(dtype)

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def describe(self) -> str:
        return "the seeded init"


class ZerosSource(Source):
    """Zeros of `shapes[name]` (and `dtypes[name]`); a narrow allocates only its slice."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict | None = None):
        self.shapes, self.dtypes, self.aliases = dict(shapes), dict(dtypes or {}), {}

    def names(self):
        return self.shapes.keys()

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        shape = [hi - lo if d in narrow else n for d, n in enumerate(self.shapes[name])
                 for lo, hi in [narrow.get(d, (0, n))]]
        return torch.zeros(shape, dtype=self.dtypes.get(name, torch.float32))

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def describe(self) -> str:
        return "the zero-initialised tensors"


class PrefixedSource(Source):
    """`source`'s tensor `n` under the name prefix + n, and under n itself (a graph that wraps the
    model as `model` holds its tensors as model.<n>, and the tensors the passes add at the top)."""

    def __init__(self, source: Source, prefix: str):
        self.source, self.prefix = source, prefix
        self.aliases = dict(source.aliases)
        self.aliases.update({prefix + k: [prefix + o for o in v] for k, v in source.aliases.items()})

    def names(self):
        inner = list(self.source._names())
        return [self.prefix + n for n in inner] + inner

    def _inner(self, name: str) -> str:
        stripped = name[len(self.prefix):] if name.startswith(self.prefix) else name
        return stripped if stripped in self.source._names() else name

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        return self.source._read(self._inner(name), narrow)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.source._shape(self._inner(name))

    def describe(self) -> str:
        return f"{self.source.describe()} (also under {self.prefix!r})"


class ChainSource(Source):
    """Each tensor from the first of `sources` that has it."""

    def __init__(self, *sources: Source):
        self.sources = sources
        self.aliases = {k: v for s in reversed(sources) for k, v in s.aliases.items()}

    def names(self):
        return [n for s in self.sources for n in s._names()]

    def _pick(self, name: str) -> Source:
        return next(s for s in self.sources if name in s._names())

    def _read(self, name: str, narrow: dict) -> torch.Tensor:
        return self._pick(name)._read(name, narrow)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._pick(name)._shape(name)

    def describe(self) -> str:
        return " + ".join(s.describe() for s in self.sources)


def tied_aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """{name: [other names of the same tensor]} for the parameters and buffers of `module`."""
    groups: dict[int, list[str]] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    return {n: [m for m in names if m != n] for names in groups.values() for n in names if len(names) > 1}
