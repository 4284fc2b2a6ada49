"""Typed, frozen plan: what to convert, how to shrink, how to lower and partition.

A plan is data. Build it with `Plan.from_dict`, `Plan.from_file` (TOML or JSON) or the
dataclasses directly. Every field is checked when the plan is built; checks that need the model
(how many blocks, which expert counts) happen in `MoEPlan.layer_experts` when the plan meets it.

    [moe]
    experts = [32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 64, 64]   # or 32, or "32x10+64x2"
    every = 2          # block i (0-based) is MoE when (i + 1) % every == 0
    top_k = 1
    residual = true    # PR-MoE: dense MLP always runs, one routed expert added

    [student]
    layers = 21

    [parallel]
    nodes = 2
    devices_per_node = 4
    ep = "auto"

    [lowering]
    gating = "auto"
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import PlanError

ExpertSpec = Union[int, tuple, str, dict]

_NOISY_GATES = (None, "jitter", "rsample")
_INITS = ("upcycle", "random")
_COMBINE_WEIGHTS = ("auto", "prob", "unit")
_GATING_IMPLS = ("auto", "triton", "torch")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(msg)


@dataclass(frozen=True)
class MoEPlan:
    """How dense FFN blocks become MoE layers (DeepSpeed-MoE semantics).

    experts: int (same count everywhere), a list with one count per MoE layer, a string
        "32x10+64x2" (count x layers, shallow to deep), or a pyramid dict
        {"levels": [32, 64], "boundaries": [0.8]}: MoE layers whose relative depth
        (index / number of MoE layers) is below 0.8 get 32 experts, the rest 64.
    every: block i (0-based) is MoE when (i + 1) % every == 0 (DeepSpeed/Megatron convention).
    combine_weight: "prob" is DeepSpeed's (top-1 weight = gate probability; top-k renormalised);
        "unit" makes the top-1 weight p / p.detach() (value 1, gradient of p) so an upcycled
        model computes the dense function exactly while the router still learns;
        "auto" is "unit" with init="upcycle", else "prob".
    init_noise: relative std of seeded noise added to copied expert weights (upcycle only);
        breaks the symmetry of identical experts at the cost of exact function preservation.
    generic_experts: run every layer's experts as vmapped copies of the FFN subgraph
        (GenericExperts) even where stacked matrices (StackedExperts, faster) would do; FFNs with
        inner matrices always use the generic path.
    """

    experts: ExpertSpec = 8
    every: int = 1
    top_k: int = 1
    residual: bool = False
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    noisy_gate: str | None = None
    use_rts: bool = False
    init: str = "upcycle"
    init_noise: float = 0.0
    combine_weight: str = "auto"
    generic_experts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        e = self.experts
        if isinstance(e, list):
            object.__setattr__(self, "experts", tuple(e))
            e = self.experts
        _check(isinstance(e, (int, tuple, str, dict)) and not isinstance(e, bool),
               f"moe.experts must be an int, a list, a 'NxL+MxK' string or a pyramid dict, got {e!r}")
        if isinstance(e, int):
            _check(e >= 1, f"moe.experts must be >= 1, got {e}")
        if isinstance(e, tuple):
            _check(len(e) > 0, "moe.experts list is empty: give one expert count per MoE layer")
            for i, c in enumerate(e):
                _check(isinstance(c, int) and not isinstance(c, bool) and c >= 1,
                       f"moe.experts[{i}] must be a positive int, got {c!r}")
        if isinstance(e, str):
            _parse_expert_string(e)
        if isinstance(e, dict):
            _check_pyramid(e)
        _check(isinstance(self.every, int) and self.every >= 1, f"moe.every must be an int >= 1, got {self.every!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 1, f"moe.top_k must be an int >= 1, got {self.top_k!r}")
        _check(self.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        _check(self.eval_capacity_factor > 0, f"moe.eval_capacity_factor must be > 0, got {self.eval_capacity_factor}")
        _check(isinstance(self.min_capacity, int) and self.min_capacity >= 0,
               f"moe.min_capacity must be an int >= 0, got {self.min_capacity!r}")
        _check(self.aux_loss_coef >= 0, f"moe.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        _check(self.noisy_gate in _NOISY_GATES, f"moe.noisy_gate must be one of {_NOISY_GATES}, got {self.noisy_gate!r}")
        _check(self.init in _INITS, f"moe.init must be one of {_INITS}, got {self.init!r}")
        _check(self.init_noise >= 0, f"moe.init_noise must be >= 0, got {self.init_noise}")
        _check(self.combine_weight in _COMBINE_WEIGHTS,
               f"moe.combine_weight must be one of {_COMBINE_WEIGHTS}, got {self.combine_weight!r}")
        _check(not (self.use_rts and self.top_k != 1), "moe.use_rts (random token selection) only exists for top_k = 1")

    @property
    def unit_top1(self) -> bool:
        """Whether a top-1 combine weight is p / p.detach() rather than p."""
        mode = self.combine_weight
        if mode == "auto":
            mode = "unit" if self.init == "upcycle" else "prob"
        return mode == "unit"

    def moe_blocks(self, num_blocks: int) -> list[int]:
        """0-based indices of the blocks that become MoE: (i + 1) % every == 0."""
        return [i for i in range(num_blocks) if (i + 1) % self.every == 0]

    def layer_experts(self, num_blocks: int) -> dict[int, int]:
        """Map block index -> expert count for a model with `num_blocks` blocks.

        Raises PlanError when the plan does not fit (wrong list length, top_k > experts, ...).
        """
        blocks = self.moe_blocks(num_blocks)
        _check(len(blocks) > 0,
               f"moe.every = {self.every} selects no block of a model with {num_blocks} blocks: "
               f"use every <= {num_blocks}")
        n = len(blocks)
        e = self.experts
        if isinstance(e, int):
            counts = [e] * n
        elif isinstance(e, tuple):
            counts = list(e)
        elif isinstance(e, str):
            counts = _parse_expert_string(e)
        else:
            counts = _pyramid_counts(e, n)
        _check(len(counts) == n,
               f"moe.experts gives {len(counts)} counts but the model has {num_blocks} blocks and "
               f"every = {self.every} makes {n} MoE layers (blocks {blocks}): give {n} counts")
        for b, c in zip(blocks, counts):
            _check(self.top_k <= c, f"moe.top_k = {self.top_k} exceeds the {c} experts of block {b}: "
                                    f"lower top_k or raise that layer's expert count")
        return dict(zip(blocks, counts))


def _parse_expert_string(s: str) -> list[int]:
    counts: list[int] = []
    for part in s.replace(" ", "").split("+"):
        m = re.fullmatch(r"(\d+)(?:[x*](\d+))?", part)
        _check(m is not None and int(m.group(1)) >= 1,
               f"moe.experts string {s!r} is not of the form '32x10+64x2' (count x layers)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _check_pyramid(d: dict) -> None:
    _check(set(d) <= {"levels", "boundaries"} and "levels" in d,
           f"moe.experts pyramid dict takes 'levels' and 'boundaries', got keys {sorted(d)}")
    levels, bounds = list(d["levels"]), list(d.get("boundaries", []))
    _check(len(levels) == len(bounds) + 1,
           f"moe.experts pyramid needs len(levels) == len(boundaries) + 1, got {len(levels)} and {len(bounds)}")
    _check(all(isinstance(c, int) and c >= 1 for c in levels), f"pyramid levels must be positive ints, got {levels}")
    _check(all(0 < b < 1 for b in bounds) and bounds == sorted(bounds),
           f"pyramid boundaries must be increasing fractions in (0, 1), got {bounds}")


def _pyramid_counts(d: dict, n: int) -> list[int]:
    levels, bounds = list(d["levels"]), list(d.get("boundaries", []))
    return [levels[sum(i / n >= b for b in bounds)] for i in range(n)]


@dataclass(frozen=True)
class StudentPlan:
    """Mixture-of-Students depth shrinking: give `layers` (count) or `depth` (fraction).

    keep: "auto" (evenly spaced, always keeping the first block and the deepest MoE layers) or an
    explicit list of 0-based teacher block indices.
    """

    layers: int | None = None
    depth: float | None = None
    keep: Any = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(self.keep))
        _check(self.layers is not None or self.depth is not None or isinstance(self.keep, tuple),
               "student needs `layers` (block count), `depth` (fraction) or an explicit `keep` list")
        _check(self.layers is None or self.depth is None, "give student.layers or student.depth, not both")
        _check(self.layers is None or (isinstance(self.layers, int) and self.layers >= 1),
               f"student.layers must be an int >= 1, got {self.layers!r}")
        _check(self.depth is None or 0 < self.depth <= 1, f"student.depth must be in (0, 1], got {self.depth!r}")
        _check(self.keep == "auto" or (isinstance(self.keep, tuple) and all(isinstance(i, int) for i in self.keep)),
               f"student.keep must be 'auto' or a list of block indices, got {self.keep!r}")

    def num_layers(self, num_blocks: int) -> int:
        """How many blocks the student keeps out of the teacher's `num_blocks`."""
        if isinstance(self.keep, tuple) and self.layers is None and self.depth is None:
            n = len(self.keep)
        elif self.layers is not None:
            n = self.layers
        else:
            n = max(1, round(self.depth * num_blocks))
        _check(n <= num_blocks, f"student.layers = {n} exceeds the teacher's {num_blocks} blocks")
        return n


@dataclass(frozen=True)
class ParallelPlan:
    """How the converted graph is spread over ranks.

    world = nodes * devices_per_node = tp * dp. Each MoE layer has an expert-parallel degree
    (`ep`: "auto", one int, or one value per MoE layer) and expert-data-parallel degree
    world / (ep * tp_experts). `hierarchical_a2a`: True, False or "auto" (cost model per layer).
    """

    nodes: int = 1
    devices_per_node: int = 1
    tp: int = 1
    ep: Any = "auto"
    hierarchical_a2a: Any = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.ep, list):
            object.__setattr__(self, "ep", tuple(self.ep))
        for name in ("nodes", "devices_per_node", "tp"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"parallel.{name} must be an int >= 1, got {v!r}")
        _check(self.ep == "auto" or (isinstance(self.ep, int) and self.ep >= 1)
               or (isinstance(self.ep, tuple) and all(isinstance(x, int) and x >= 1 for x in self.ep)),
               f"parallel.ep must be 'auto', an int >= 1 or a list of them, got {self.ep!r}")
        _check(self.hierarchical_a2a in (True, False, "auto"),
               f"parallel.hierarchical_a2a must be true, false or 'auto', got {self.hierarchical_a2a!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class LoweringPlan:
    """Which implementation the gate / dispatch / combine nodes get: "auto", "triton" or "torch"."""

    gating: str = "auto"

    def __post_init__(self) -> None:
        _check(self.gating in _GATING_IMPLS, f"lowering.gating must be one of {_GATING_IMPLS}, got {self.gating!r}")


@dataclass(frozen=True)
class Plan:
    """The whole plan. Sections left out are not run (no `moe` -> no PR-MoE rewrite).

    disable: names of passes to switch off (e.g. ["lower_gating"]).
    """

    moe: MoEPlan | None = None
    student: StudentPlan | None = None
    parallel: ParallelPlan | None = None
    lowering: LoweringPlan = field(default_factory=LoweringPlan)
    disable: tuple = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Build a Plan from a nested dict (as read from TOML/JSON); unknown keys are errors."""
        _check(isinstance(d, dict), f"a plan must be a dict, got {type(d).__name__}")
        sections = {"moe": MoEPlan, "student": StudentPlan, "parallel": ParallelPlan, "lowering": LoweringPlan}
        unknown = set(d) - set(sections) - {"disable"}
        _check(not unknown, f"unknown plan section(s) {sorted(unknown)}; known: {sorted(sections) + ['disable']}")
        kwargs: dict[str, Any] = {}
        for name, typ in sections.items():
            if name in d and d[name] is not None:
                kwargs[name] = _build(typ, d[name], name)
        if "disable" in d:
            kwargs["disable"] = tuple(d["disable"])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "Plan":
        """Read a plan from a .toml or .json file."""
        p = Path(path)
        _check(p.exists(), f"plan file {str(p)!r} does not exist")
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        elif p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        else:
            raise PlanError(f"plan file {str(p)!r} must end in .toml or .json")
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> "Plan":
        """The built-in default: PR-MoE (residual, top-1) every other block, 4 then 8 experts."""
        return cls(moe=MoEPlan(experts={"levels": [4, 8], "boundaries": [0.5]}, every=2, top_k=1, residual=True,
                               drop_tokens=False))

    def to_dict(self) -> dict:
        """The plan as a plain dict (round-trips through `from_dict`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v)
        return out


def _build(typ, section: Any, name: str):
    if isinstance(section, typ):
        return section
    _check(isinstance(section, dict), f"plan section [{name}] must be a table/dict, got {type(section).__name__}")
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(section) - known
    _check(not unknown, f"unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    try:
        return typ(**section)
    except TypeError as e:  # wrong types that slipped past the checks
        raise PlanError(f"[{name}]: {e}") from None


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's expert capacity: ceil(k * S / E * capacity_factor), at least min_capacity."""
    return max(math.ceil((num_tokens / num_experts) * (capacity_factor * top_k)), min_capacity)
