"""Overlap the expert all-to-alls with the PR-MoE layer's independent work (stage "distribute", last).

Every expert all-to-all becomes an issue node and a separate wait node,

    t = all_to_all_start(x, out_splits, in_splits, group)     the transfer starts
    ...                                                        work that does not read t
    y = wait(t)                                                (torch's functional wait_tensor)

and the work a residual layer has beside its experts is moved between the two, where nothing
waits for it: the dense residual MLP (role "residual", computed before the router in the
converted graph; with its TP all-reduce when it is split) goes between the dispatch all-to-all's issue and wait, the mixing coefficient
(role "coef") between the combine all-to-all's issue and wait. With a hierarchical all-to-all the
inter-node step is the one overlapped (the last dispatch step, the first combine step). DeepSpeed
runs these serially; here an eager run overlaps them by node order (the collective runs on the
backend's thread while the rank computes) and a compiled run sees the same schedule, with the
wait a node of its own that Inductor's communication passes may move further.

A move is made only when it keeps the graph's meaning: every user of a moved node stays after
it, and no random node changes order with another (a dropout in the dense MLP must draw its mask
before the router's noise, as in the single-process model). A layer where either fails keeps its
order (its all-to-alls are still split); `facts(gm).overlapped_layers` lists the layers moved.
`plan.disable = ["overlap_a2a"]` switches the pass off (one fused all-to-all node per step).
"""
from __future__ import annotations

from torch import fx, nn

from .. import meta as M
from ..facts import record_facts
from ..nn import collectives as C
from ..nn.moe import moe_layers
from .base import Pass, PassContext
from .conditions import EXPERTS_PLACED
from .graph import copy_graph_module

NAME = "overlap_a2a"

_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_"}


class OverlapA2A(Pass):
    """Split each expert all-to-all into issue + wait and move the layer's independent work between."""

    name = NAME
    stage = "distribute"
    requires = (EXPERTS_PLACED,)

    def applies(self, ctx: PassContext) -> bool:
        if ctx.plan.parallel is None:
            return False
        return ctx.resolved is None or any(lp.ep > 1 for lp in ctx.resolved.layers)   # None: not resolved yet

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if not any(n.target is C.ALL_TO_ALL for n in gm.graph.nodes):
            return gm
        new = copy_graph_module(gm)
        pairs = split_all_to_alls(new.graph)
        moved = tuple(layer for layer, _ in moe_layers(new) if _schedule(new, layer, pairs.get(layer, [])))
        record_facts(new, overlapped_layers=moved)
        return new

    def ensures(self, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> None:
        super().ensures(before, after, ctx)
        if any(n.target is C.ALL_TO_ALL for n in after.graph.nodes):
            raise AssertionError("an all-to-all was left fused after overlap_a2a")
        starts = [n for n in after.graph.nodes if n.target is C.ALL_TO_ALL_START]
        for s in starts:
            waits = [u for u in s.users if u.target is C.WAIT]
            if len(s.users) != 1 or len(waits) != 1:
                raise AssertionError(f"{s.name}: an issued all-to-all must be read by exactly one wait, "
                                     f"not {[u.name for u in s.users]}")


OVERLAP_A2A = OverlapA2A()


def split_all_to_alls(graph: fx.Graph) -> dict[int, list[tuple[fx.Node, fx.Node]]]:
    """Replace every fused all-to-all node by `all_to_all_start` + `wait` (in place, same position);
    returns MoE layer -> its (start, wait) pairs in graph order."""
    pairs: dict[int, list[tuple[fx.Node, fx.Node]]] = {}
    for n in list(graph.nodes):
        if n.target is not C.ALL_TO_ALL:
            continue
        with graph.inserting_before(n):
            start = graph.call_function(C.ALL_TO_ALL_START, n.args, n.kwargs)
            done = graph.call_function(C.WAIT, (start,))
        start.meta.update(n.meta)
        M.tag(done, NAME, "collective", n.meta.get(M.LAYER), n.meta.get(M.BLOCK))   # no group: it only waits
        n.replace_all_uses_with(done)
        graph.erase_node(n)
        pairs.setdefault(n.meta.get(M.LAYER), []).append((start, done))
    return pairs


def _schedule(gm: fx.GraphModule, layer: int, pairs: list[tuple[fx.Node, fx.Node]]) -> bool:
    """Move layer `layer`'s residual MLP into its dispatch all-to-all and its coefficient into the
    combine all-to-all; True when anything moved."""
    dispatch = [p for p in pairs if p[0].meta.get(M.A2A) == "dispatch"]
    combine = [p for p in pairs if p[0].meta.get(M.A2A) == "combine"]
    if not dispatch or not combine:
        return False
    block = dispatch[-1][0].meta.get(M.BLOCK)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start, done = dispatch[-1]
    residual = {n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "residual" and n.meta.get(M.BLOCK) == block
                and order[n] < order[start]}
    grown = True
    while grown:              # with TP, the MLP's output all-reduce (and what reads it) goes along
        extra = {u for n in residual for u in n.users if u not in residual and order[u] < order[start]
                 and u.meta.get(M.ROLE) in ("residual", "collective")}
        residual |= extra
        grown = bool(extra)
    moved = _move(gm, sorted(residual, key=order.get), start, done, order)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start, done = combine[0]
    coef = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "coef" and n.meta.get(M.LAYER) == layer
            and order[n] > order[done]]
    return _move(gm, coef, start, done, order) or moved


def _move(gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node, done: fx.Node, order: dict) -> bool:
    """Put `nodes` (in their order) just before `done` when that keeps every input before and every user
    after them, and no random node crosses another; False (nothing changed) otherwise."""
    if not nodes:
        return False
    group = set(nodes)
    lo, hi = min(order[n] for n in nodes), order[done]
    if any(order[a] >= hi and a not in group for n in nodes for a in n.all_input_nodes):
        return False                                # an input is computed after the wait point
    if any(order[u] <= hi and u not in group for n in nodes for u in n.users):
        return False                                # a user would end up before its input
    top = max(hi, max(order[n] for n in nodes))
    crossed = [n for n in gm.graph.nodes if min(lo, hi) <= order[n] <= top and n not in group]
    if any(_random(gm, n) for n in nodes) and any(_random(gm, n) for n in crossed):
        return False
    for n in nodes:
        done.prepend(n)
    return True


def _random(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether running `n` may draw from the random number generator (conservative for modules)."""
    if n.op == "call_function":
        tags = getattr(n.target, "tags", ())
        return any(str(t).endswith("nondeterministic_seeded") for t in tags)
    if n.op == "call_method":
        return n.target in _RANDOM_METHODS
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in mod.modules()):
            return True
        return any(bool(getattr(m, "noisy_gate", None)) or bool(getattr(m, "use_rts", False))
                   for m in mod.modules())
    return False
