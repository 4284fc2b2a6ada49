"""The pass contract: a name, what must hold before (`requires`), the rewrite (`call`), and what
holds after (`provides`, checked by `ensures` beside `graph.lint()` and moefx's invariants).

A pass is a stateless object (one instance in `moefx.passes.pipeline.PIPELINE`); everything a
call needs comes in the `PassContext`, and per-call state lives in locals. `call` never mutates
its input: it builds a new GraphModule (sharing unchanged parameters) and returns it, or returns
the input object itself when it changes nothing. Running a pass (`Pass.__call__`) checks
`requires` on the input, runs `call`, recompiles, verifies (`verify`) and runs `ensures`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import fx

from .. import meta as M
from ..cost import CostProfile
from ..errors import AnalysisError, PassError, PlanError
from ..parallel import ResolvedParallel

TARGETS = ("cpu", "cuda")


@dataclass(frozen=True)
class Condition:
    """A fact about a graph: passes require some and provide others.

    name: short id used in messages; description: what it means; holds(gm): whether it is true;
    input: a property of the model itself that no pass provides (it has FFNs); when it does not
    hold the model is at fault (AnalysisError), otherwise the pipeline is (PassError).
    """

    name: str
    description: str
    holds: Callable[[fx.GraphModule], bool]
    input: bool = False

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PassContext:
    """What a pass run needs besides the graph.

    plan: the Plan; rank / resolved: this rank and the resolved parallel degrees (distribute
    stage only; rank None = no rank); tokens_per_rank: message-size estimate for cost decisions;
    profile: a measured communication profile or None for defaults; target: the device type the
    graph will run on ("cpu" / "cuda"), which the device-dependent lowering decides for (gating
    kernels); None: the device the model's weights are on (a graph built on meta for a job names
    the job's device).
    """

    plan: Any
    rank: int | None = None
    resolved: ResolvedParallel | None = None
    tokens_per_rank: int = 4096
    profile: CostProfile | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise PlanError(f"target must be one of {TARGETS} (the device type the graph runs on), got {self.target!r}")


class Pass(abc.ABC):
    """One FX pass; see the module docstring for the contract."""

    name: ClassVar[str]
    stage: ClassVar[str]  # "convert" (moefx.convert) or "distribute" (moefx.distribute)
    requires: ClassVar[tuple[Condition, ...]] = ()
    provides: ClassVar[tuple[Condition, ...]] = ()

    def applies(self, ctx: PassContext) -> bool:
        """Whether the plan asks for this pass at all (e.g. pr_moe only with a [moe] section)."""
        return True

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """The rewrite: a new GraphModule, or `gm` itself when nothing changes."""

    def ensures(self, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> None:
        """Post-conditions beyond `provides` (raise AssertionError); the default checks `provides`."""
        for cond in self.provides:
            if not cond.holds(after):
                raise AssertionError(f"{cond.name} ({cond.description}) does not hold after the pass")

    def check_requires(self, gm: fx.GraphModule) -> None:
        """Raise when a required condition does not hold on `gm` (AnalysisError for input conditions,
        PassError for conditions an earlier pass should have established)."""
        for cond in self.requires:
            if not cond.holds(gm):
                raise (AnalysisError if cond.input else PassError)(
                    f"pass {self.name!r} requires {cond.name}: {cond.description}, which does not hold for this graph")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        self.check_requires(gm)
        out = self.call(gm, ctx)
        out.recompile()
        verify(out)
        self.ensures(gm, out, ctx)
        return out

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def verify(gm: fx.GraphModule) -> None:
    """graph.lint() plus moefx invariants; raises AssertionError on a violation.

    - every dispatch has its combine (per MoE layer; gather-path layers have neither buffer);
    - every all-to-all dispatch step has its combine step (per layer and group);
    - every node with a created role carries its pass provenance;
    - every call_module target exists.
    """
    gm.graph.lint()
    dispatches = sorted(n.meta.get(M.LAYER) for n in gm.graph.nodes if n.meta.get(M.ROLE) == "dispatch")
    combines = sorted(n.meta.get(M.LAYER) for n in gm.graph.nodes
                      if n.meta.get(M.ROLE) == "combine" and n.meta.get(M.PATH) != "gather")
    if dispatches != combines:
        raise AssertionError(f"every dispatch needs its combine: dispatch layers {dispatches}, combine layers {combines}")
    a2a: dict = {}
    for n in gm.graph.nodes:
        step = n.meta.get(M.A2A)
        if step in ("dispatch", "combine"):
            a2a.setdefault((n.meta.get(M.LAYER), n.meta.get(M.GROUP)), []).append(step)
    for key, steps in a2a.items():
        if steps.count("dispatch") != steps.count("combine"):
            raise AssertionError(f"all-to-all of layer {key[0]} on group {key[1]}: {steps.count('dispatch')} "
                                 f"dispatch vs {steps.count('combine')} combine steps")
    for n in gm.graph.nodes:
        if n.meta.get(M.ROLE) in M.CREATED_ROLES and M.PASS not in n.meta:
            raise AssertionError(f"node {n.name} has role {n.meta[M.ROLE]!r} but no {M.PASS!r} provenance")
        if n.op == "call_module":
            gm.get_submodule(n.target)
