"""Typed, frozen plan: what to convert, how to shrink, how to lower and partition.

A plan is data. Build it with `Plan.from_dict`, `Plan.from_file` (TOML or JSON) or the
dataclasses directly. Every field is checked when the plan is built, strictly: a bool is not an
int, a string is not a bool (`residual = "no"` is an error, not a truthy string), floats must be
finite. Checks that need the model (how many blocks, which expert counts) happen when the plan
meets it (`MoEPlan.layer_experts`, `moefx.parallel.validate_parallel`).

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

# The passes of `moefx.passes.pipeline.PIPELINE`, in order (plan.disable is checked against them here,
# so a plan is validated without importing the passes; the pipeline asserts it matches).
PASS_NAMES = ("pr_moe", "shrink", "lower_gating", "expert_parallel", "tensor_parallel", "hierarchical_a2a",
              "overlap_a2a")

_NOISY_GATES = (None, "jitter", "rsample")
_INITS = ("upcycle", "random")
_COMBINE_WEIGHTS = ("auto", "prob", "unit")
_GATING_IMPLS = ("auto", "triton", "torch")
_EXPERT_PATHS = ("auto", "buffer", "gather")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(msg)


def _kind(v: Any) -> str:
    return type(v).__name__


def _int(where: str, v: Any, minimum: int | None = None) -> int:
    """An int (not a bool, not a float or string) >= minimum."""
    _check(isinstance(v, int) and not isinstance(v, bool),
           f"{where} must be an integer, got {v!r} ({_kind(v)})" + (": write it without quotes" if isinstance(v, str)
                                                                  else ""))
    _check(minimum is None or v >= minimum, f"{where} must be >= {minimum}, got {v}")
    return v


def _float(where: str, v: Any, minimum: float | None = None, *, exclusive: bool = False) -> float:
    """A finite number (int or float, not a bool or string) above minimum."""
    _check(isinstance(v, (int, float)) and not isinstance(v, bool),
           f"{where} must be a number, got {v!r} ({_kind(v)})" + (": write it without quotes" if isinstance(v, str)
                                                                 else ""))
    _check(math.isfinite(v), f"{where} must be finite, got {v}")
    if minimum is not None:
        ok = v > minimum if exclusive else v >= minimum
        _check(ok, f"{where} must be {'>' if exclusive else '>='} {minimum}, got {v}")
    return float(v)


def _bool(where: str, v: Any) -> bool:
    _check(isinstance(v, bool), f"{where} must be true or false, got {v!r} ({_kind(v)})"
           + (": write true / false without quotes" if isinstance(v, str) else ""))
    return v


def _choice(where: str, v: Any, choices: tuple) -> Any:
    _check(any(v is c or (v == c and type(v) is type(c)) for c in choices),
           f"{where} must be one of {list(choices)}, got {v!r}")
    return v


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
    z_loss_coef: weight of the router z-loss (mean of logsumexp(logits)^2, ST-MoE) added to the
        aux loss; 0 turns it off.
    """

    # The defaults are the paper's PR-MoE: a pyramid (4 experts in the shallower half of the MoE
    # layers, 8 in the deeper), every other block, residual MLP, top-1, dropless. A plan file that
    # sets only some keys gets these for the rest, as no plan at all does (Plan.default()).
    experts: ExpertSpec = field(default_factory=lambda: {"levels": [4, 8], "boundaries": [0.5]})
    every: int = 2
    top_k: int = 1
    residual: bool = True
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
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
            _int("moe.experts", e, 1)
        if isinstance(e, tuple):
            _check(len(e) > 0, "moe.experts list is empty: give one expert count per MoE layer")
            for i, c in enumerate(e):
                _int(f"moe.experts[{i}]", c, 1)
        if isinstance(e, str):
            _parse_expert_string(e)
        if isinstance(e, dict):
            _check_pyramid(e)
        _int("moe.every", self.every, 1)
        _int("moe.top_k", self.top_k, 1)
        _bool("moe.residual", self.residual)
        _float("moe.capacity_factor", self.capacity_factor, 0, exclusive=True)
        _float("moe.eval_capacity_factor", self.eval_capacity_factor, 0, exclusive=True)
        _int("moe.min_capacity", self.min_capacity, 0)
        _bool("moe.drop_tokens", self.drop_tokens)
        _float("moe.aux_loss_coef", self.aux_loss_coef, 0)
        _float("moe.z_loss_coef", self.z_loss_coef, 0)
        _choice("moe.noisy_gate", self.noisy_gate, _NOISY_GATES)
        _bool("moe.use_rts", self.use_rts)
        _choice("moe.init", self.init, _INITS)
        _float("moe.init_noise", self.init_noise, 0)
        _choice("moe.combine_weight", self.combine_weight, _COMBINE_WEIGHTS)
        _bool("moe.generic_experts", self.generic_experts)
        _int("moe.seed", self.seed, 0)
        _check(not (self.use_rts and self.top_k != 1), "moe.use_rts (random token selection) only exists for top_k = 1")

    @property
    def unit_top1(self) -> bool:
        """Whether a top-1 combine weight is p / p.detach() rather than p."""
        mode = self.combine_weight
        if mode == "auto":
            mode = "unit" if self.init == "upcycle" else "prob"
        return mode == "unit"

    def inexact_reasons(self) -> list[str]:
        """Why the converted model will not compute the dense function at initialisation (each reason
        names the setting and the value that would keep it exact); empty when it will."""
        reasons = []
        if self.init != "upcycle":
            reasons.append(f'init = "{self.init}" re-initialises the experts (init = "upcycle" copies the dense FFN)')
        if self.drop_tokens:
            reasons.append("drop_tokens = true drops tokens over capacity (drop_tokens = false keeps them all)")
        if self.init_noise:
            reasons.append(f"init_noise = {self.init_noise} perturbs the copied experts (init_noise = 0 keeps them "
                           "equal)")
        if self.top_k == 1 and not self.unit_top1:
            reasons.append('combine_weight = "prob" scales each top-1 output by its gate probability '
                           '(combine_weight = "unit" or "auto" keeps the value 1)')
        return reasons

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
        _check(m is not None and int(m.group(1)) >= 1 and int(m.group(2) or 1) >= 1,
               f"moe.experts string {s!r} is not of the form '32x10+64x2' (count x layers)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _check_pyramid(d: dict) -> None:
    _check(set(d) <= {"levels", "boundaries"} and "levels" in d,
           f"moe.experts pyramid dict takes 'levels' and 'boundaries', got keys {sorted(d)}")
    levels, bounds = d["levels"], d.get("boundaries", [])
    _check(isinstance(levels, (list, tuple)) and isinstance(bounds, (list, tuple)),
           "moe.experts pyramid levels and boundaries must be lists")
    _check(len(levels) == len(bounds) + 1,
           f"moe.experts pyramid needs len(levels) == len(boundaries) + 1, got {len(levels)} and {len(bounds)}")
    for i, c in enumerate(levels):
        _int(f"moe.experts.levels[{i}]", c, 1)
    for i, b in enumerate(bounds):
        _float(f"moe.experts.boundaries[{i}]", b)
    _check(all(0 < b < 1 for b in bounds) and list(bounds) == sorted(bounds),
           f"pyramid boundaries must be increasing fractions in (0, 1), got {list(bounds)}")


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
        if self.layers is not None:
            _int("student.layers", self.layers, 1)
        if self.depth is not None:
            _float("student.depth", self.depth)
            _check(0 < self.depth <= 1, f"student.depth must be in (0, 1], got {self.depth!r}")
        if isinstance(self.keep, tuple):
            for i, b in enumerate(self.keep):
                _int(f"student.keep[{i}]", b, 0)
        else:
            _check(self.keep == "auto", f"student.keep must be 'auto' or a list of block indices, got {self.keep!r}")

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
    world / ep. `hierarchical_a2a`: true, false or "auto" (cost model per layer).
    `coordinated_a2a`: with tp > 1, each TP rank dispatches only its 1/tp share of the (replicated)
    tokens and the expert outputs are all-gathered over the TP group (the paper's
    parallelism-coordinated communication); false sends every token from every TP rank.
    Checks that need no model (tp and every explicit ep divide the world, TP groups inside nodes)
    run here; `moefx.parallel.validate_parallel` adds the ones that need the expert counts.
    """

    nodes: int = 1
    devices_per_node: int = 1
    tp: int = 1
    ep: Any = "auto"
    hierarchical_a2a: Any = "auto"
    coordinated_a2a: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ep, list):
            object.__setattr__(self, "ep", tuple(self.ep))
        for name in ("nodes", "devices_per_node", "tp"):
            _int(f"parallel.{name}", getattr(self, name), 1)
        ep = self.ep
        if isinstance(ep, tuple):
            _check(len(ep) > 0, "parallel.ep list is empty: give one degree per MoE layer (or 'auto')")
            for i, e in enumerate(ep):
                _int(f"parallel.ep[{i}]", e, 1)
        else:
            _check(ep == "auto" if isinstance(ep, str) else isinstance(ep, int) and not isinstance(ep, bool),
                   f"parallel.ep must be 'auto', an int >= 1 or a list of them, got {ep!r}")
            if ep != "auto":
                _int("parallel.ep", ep, 1)
        _choice("parallel.hierarchical_a2a", self.hierarchical_a2a, (True, False, "auto"))
        _bool("parallel.coordinated_a2a", self.coordinated_a2a)
        errors = self.world_errors()
        _check(not errors, "\n".join(errors))

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def world_errors(self) -> list[str]:
        """Every degree of this section that does not fit its own world (no model needed)."""
        world, g, tp = self.world_size, self.devices_per_node, self.tp
        errors = []
        if world % tp:
            errors.append(f"parallel: tp * dp != world_size: tp = {tp} does not divide world_size = nodes * "
                          f"devices_per_node = {self.nodes} * {g} = {world}")
        elif g % tp and tp % g:
            errors.append(f"parallel: tp = {tp} straddles nodes of {g} devices (TP groups are consecutive ranks): "
                          f"choose a tp that divides devices_per_node {g} or is a multiple of it")
        eps = self.ep if isinstance(self.ep, tuple) else (() if self.ep == "auto" else (self.ep,))
        for i, e in enumerate(eps):
            where = f"MoE layer {i}: " if isinstance(self.ep, tuple) else ""
            if e > world or world % e:
                errors.append(f"parallel: {where}ep * edp != world_size: ep = {e} does not divide world_size {world}")
            elif self.hierarchical_a2a is True and e > 1 and e % g and g % e:
                errors.append(f"parallel: {where}hierarchical_a2a = true needs EP groups of whole nodes, but ep = "
                              f"{e} is neither a multiple nor a divisor of devices_per_node {g}")
        return errors


@dataclass(frozen=True)
class LoweringPlan:
    """Implementations chosen by the lowering pass.

    gating: the route / dispatch / combine nodes: "auto" (Triton on CUDA, else PyTorch), "triton"
    or "torch".
    experts: how MoE layers run their experts: "buffer" (tokens dispatched into the [E, C, d]
    capacity buffer, batched matmuls: many tokens per expert), "gather" (each token's k choices
    sorted by expert and run through the chosen experts' weights in place: few tokens, static
    shapes, each used expert read once, what a decode step needs), or "auto": "gather" for graphs
    whose token count S is static and at most `gather_max_tokens` (a decode step) when the layer is
    not expert-parallel, else "buffer".
    """

    gating: str = "auto"
    experts: str = "auto"
    gather_max_tokens: int = 64

    def __post_init__(self) -> None:
        _choice("lowering.gating", self.gating, _GATING_IMPLS)
        _choice("lowering.experts", self.experts, _EXPERT_PATHS)
        _int("lowering.gather_max_tokens", self.gather_max_tokens, 1)


@dataclass(frozen=True)
class Plan:
    """The whole plan. Sections left out are not run (no `moe` -> no PR-MoE rewrite).

    disable: names of passes to switch off (from PASS_NAMES, e.g. ["lower_gating"]).
    """

    moe: MoEPlan | None = None
    student: StudentPlan | None = None
    parallel: ParallelPlan | None = None
    lowering: LoweringPlan = field(default_factory=LoweringPlan)
    disable: tuple = ()

    def __post_init__(self) -> None:
        if isinstance(self.disable, list):
            object.__setattr__(self, "disable", tuple(self.disable))
        hint = f": write disable = [{self.disable!r}]" if isinstance(self.disable, str) else ""
        _check(isinstance(self.disable, tuple),
               f"disable must be a list of pass names, got {self.disable!r} ({_kind(self.disable)}){hint}")
        for name in self.disable:
            _check(isinstance(name, str) and name in PASS_NAMES,
                   f"disable names an unknown pass {name!r}; the passes are {list(PASS_NAMES)}")
        for name, typ in (("moe", MoEPlan), ("student", StudentPlan), ("parallel", ParallelPlan)):
            v = getattr(self, name)
            _check(v is None or isinstance(v, typ), f"Plan.{name} must be a {typ.__name__} or None, got {_kind(v)}")
        _check(isinstance(self.lowering, LoweringPlan),
               f"Plan.lowering must be a LoweringPlan, got {_kind(self.lowering)}")

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Build a Plan from a nested dict (as read from TOML/JSON); unknown keys are errors."""
        _check(isinstance(d, dict), f"a plan must be a dict, got {_kind(d)}")
        sections = {"moe": MoEPlan, "student": StudentPlan, "parallel": ParallelPlan, "lowering": LoweringPlan}
        unknown = set(d) - set(sections) - {"disable"}
        _check(not unknown, f"unknown plan section(s) {sorted(unknown)}; known: {sorted(sections) + ['disable']}")
        kwargs: dict[str, Any] = {}
        for name, typ in sections.items():
            if name in d and d[name] is not None:
                kwargs[name] = _build(typ, d[name], name)
        if "disable" in d:
            kwargs["disable"] = d["disable"]
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "Plan":
        """Read a plan from a .toml or .json file; a syntax error names the file, line and column."""
        p = Path(path)
        _check(p.exists(), f"plan file {str(p)!r} does not exist")
        _check(p.suffix in (".toml", ".json"), f"plan file {str(p)!r} must end in .toml or .json")
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{p}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
        except tomllib.TOMLDecodeError as e:
            raise PlanError(f"{p}: not valid TOML: {_toml_message(e)}") from None
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from None

    @classmethod
    def default(cls) -> "Plan":
        """The built-in default: PR-MoE (residual, top-1, dropless) every other block, 4 then 8 experts
        (MoEPlan's defaults)."""
        return cls(moe=MoEPlan())

    def describe(self) -> str:
        """Every resolved setting, one line per section ("[moe] experts=... every=2 ..."), defaults
        included: what a job prints at start so a run says exactly what it ran."""
        lines = []
        for name, section in self.to_dict().items():
            if isinstance(section, dict):
                lines.append(f"[{name}] " + " ".join(f"{k}={v!r}" for k, v in section.items()))
            else:
                lines.append(f"{name} = {section!r}")
        return "\n".join(lines) or "(empty plan: nothing to convert)"

    def to_dict(self) -> dict:
        """The plan as a plain dict (round-trips through `from_dict`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = _plain(dataclasses.asdict(v)) if dataclasses.is_dataclass(v) else list(v)
        return out


def _plain(d: dict) -> dict:
    """Tuples as lists, so the dict is JSON/TOML-shaped."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _toml_message(e: Exception) -> str:
    """tomllib's message already ends with '(at line L, column C)'; keep it on one line."""
    return str(e).replace("\n", " ")


def _build(typ, section: Any, name: str):
    if isinstance(section, typ):
        return section
    _check(isinstance(section, dict), f"plan section [{name}] must be a table/dict, got {_kind(section)}")
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(section) - known
    _check(not unknown, f"unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    return typ(**section)
