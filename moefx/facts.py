"""What capture and the passes leave on a graph: one typed record, read and written here only.

    facts(gm).passes            ("pr_moe", "lower_gating", ...)
    record_facts(gm, num_blocks=12)

The record lives in `gm.meta["moefx"]` (a frozen `GraphFacts`; it travels with the GraphModule
through copies and deep copies). What can be read off the graph itself is computed, not stored:
`collective_counts(gm)` (collective nodes per process group) and `gather_layers(gm)` (the MoE
layers that run their experts on the gather path). Per-node facts (block, role, layer, group,
gating implementation) are `moefx.meta`'s node.meta keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from . import meta as M

if TYPE_CHECKING:                   # annotations only: this module imports no other moefx layer
    from .cost import CostProfile
    from .parallel import ResolvedParallel
    from .placement import Placement


__all__ = ["KEY", "GraphFacts", "facts", "record_facts", "placements", "collective_counts", "gather_layers"]

KEY = "moefx"


@dataclass(frozen=True)
class GraphFacts:
    """Facts about a captured / converted / partitioned graph.

    capture_seconds / train_capture: how long torch.export took, and whether dropout was kept;
    origin: how to rebuild the dense model and replay the capture (`moefx.origin`);
    passes: the passes run, in order; counters: per pass, how many things it rewrote;
    num_blocks: Transformer blocks (FFNs) of the converted model; recipes: global tensor name ->
    how a pass-made tensor is built (`moefx.recipes`); student_keep / block_origin: the teacher
    blocks a MoS student kept, and each block's index in the first teacher (`shrink`);
    rank / parallel: this rank and the resolved degrees (partitioned graphs only); placements:
    local tensor name -> where it sits globally (`moefx.placement`); expert_parallel: each MoE
    layer's EP degree (set by `expert_parallel`); tp_replicated: what tensor parallelism left whole;
    hierarchical_layers: MoE layers whose all-to-all is hierarchical; overlapped_layers: MoE layers
    whose residual MLP / coefficient run while their all-to-alls are in flight (`overlap_a2a`); reduced_products: what
    `reduce_products` rewrote ({"linears": n, "experts": [layer, ...]}); profile: the cost profile
    a rank's build decided with.
    """

    capture_seconds: float | None = None
    train_capture: bool = False
    origin: Mapping[str, Any] | None = None
    passes: tuple[str, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)
    num_blocks: int | None = None
    recipes: Mapping[str, Any] = field(default_factory=dict)
    student_keep: tuple[int, ...] | None = None
    block_origin: tuple[int, ...] | None = None
    rank: int | None = None
    parallel: ResolvedParallel | None = None
    placements: Mapping[str, Placement] = field(default_factory=dict)
    expert_parallel: tuple[int, ...] | None = None
    tp_replicated: tuple[str, ...] = ()
    hierarchical_layers: tuple[int, ...] = ()
    overlapped_layers: tuple[int, ...] = ()
    reduced_products: Mapping[str, Any] | None = None
    profile: CostProfile | None = None


def facts(gm) -> GraphFacts:
    """The facts recorded on `gm` (a GraphModule or any module with a `meta` dict); an empty
    record when none were."""
    meta = getattr(gm, "meta", None)
    found = meta.get(KEY) if isinstance(meta, dict) else None
    return found if isinstance(found, GraphFacts) else GraphFacts()


def record_facts(gm, **changes) -> GraphFacts:
    """Replace the named facts of `gm` (TypeError for a name GraphFacts does not have); returns the
    new record. `gm.meta` becomes a dict of its own first, so a shallow copy's record is not changed."""
    new = dataclasses.replace(facts(gm), **changes)
    gm.meta = {**(getattr(gm, "meta", None) or {}), KEY: new}
    return new


def placements(gm) -> dict[str, Placement]:
    """The placement records of a rank's GraphModule, local name -> Placement ({} when it was not
    partitioned)."""
    return dict(facts(gm).placements)


def collective_counts(gm) -> dict[str, int]:
    """Collective nodes per process-group name, counted from the graph."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.meta.get(M.ROLE) == "collective" and M.GROUP in n.meta:
            out[n.meta[M.GROUP]] = out.get(n.meta[M.GROUP], 0) + 1
    return out


def gather_layers(gm) -> list[int]:
    """The MoE layers whose experts node runs the gather path, in graph order."""
    return [n.meta.get(M.LAYER) for n in gm.graph.nodes
            if n.meta.get(M.ROLE) == "experts" and n.meta.get(M.PATH) == "gather"]
