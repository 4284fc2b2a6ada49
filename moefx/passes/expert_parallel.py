"""Expert parallelism: this rank's experts of every MoE layer, and the all-to-alls that reach them.

Runs first in stage "distribute" (after lower_gating). Requires: gating lowered (the nodes it
adds run the layer's chosen implementation). Provides: experts placed. Needs `ctx.rank` and the
resolved degrees (`moefx.parallel.validate_parallel`).

Per MoE layer (see `moefx.nn.ep_layout` for the steps):
- the experts module keeps only this rank's experts (`select`), or with expert slicing (ep > E)
  its slice of one expert's inner dimension (`slice_inner`; only FFNs whose middle is elementwise
  over f can be sliced exactly, others are a PlanError);
- capacity layers (drop_tokens = true) exchange the [E, C, d] buffer with even, static splits:
  no count exchange, no host synchronisation;
- dropless layers exchange exactly the routed rows: the routing is re-laid out as rows sorted by
  expert, the EP ranks gather each other's per-expert counts (one small all-gather on the
  tokens' device) and one host synchronisation turns them into the uneven splits;
- with tp > 1 and `parallel.coordinated_a2a` (the default), each TP rank dispatches only its
  chunk of the tokens its TP group shares (slots of the capacity buffer, or sorted rows), and the
  expert outputs are all-gathered over the TP group before the combine (the paper's
  parallelism-coordinated communication): all-to-all bytes and expert FLOPs drop by tp, and the
  combine sees exactly the same rows as without it.

Collective nodes are `moefx.nn.collectives` ops naming their group (`moefx.parallel`'s names), tagged with
meta moefx_group and moefx_a2a ("counts" / "dispatch" / "combine"). Every expert parameter gets
a placement record (`moefx.placement`): its global tensor, offsets, the EP group it is sharded
over and the EDP group its copies live on.
"""
from __future__ import annotations

import operator

from torch import fx

from .. import meta as M
from ..errors import PlanError
from ..facts import facts, record_facts
from ..nn import collectives as C
from ..nn import ep_layout as L
from ..nn.gating_ops import combine as combine_rows
from ..nn.gating_ops import dispatch as dispatch_rows
from ..nn.moe import MoELayer, moe_layers
from ..parallel import TP
from ..placement import Placement, Shard, complete
from .base import Pass, PassContext
from .conditions import EXPERTS_PLACED, GATING_LOWERED
from .graph import NodeBuilder, copy_graph_module

NAME = "expert_parallel"
SPLITS_SOURCE = "moefx_splits_source"  # node.meta of an EP all-to-all: the node its splits come from


class ExpertParallel(Pass):
    """Partition every MoE layer over its expert-parallel ranks (see the module docstring)."""

    name = NAME
    stage = "distribute"
    requires = (GATING_LOWERED,)
    provides = (EXPERTS_PLACED,)

    def applies(self, ctx: PassContext) -> bool:
        return ctx.plan.parallel is not None

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        resolved, rank = ctx.resolved, ctx.rank
        new = copy_graph_module(gm)
        placements = dict(facts(new).placements)
        layers = moe_layers(new)
        if len(layers) != len(resolved.layers):
            raise PlanError(f"the parallel plan was resolved for {len(resolved.layers)} MoE layers, the graph has "
                            f"{len(layers)}")
        for index, (layer, mod) in enumerate(layers):
            _Layer(new, ctx, layer, resolved.layers[index], mod, placements).rewrite()
        record_facts(new, placements=complete(new, placements, resolved), rank=rank, parallel=resolved,
                     expert_parallel=tuple(lp.ep for lp in resolved.layers))
        new.graph.eliminate_dead_code()
        return new

    def ensures(self, before, after, ctx) -> None:
        super().ensures(before, after, ctx)
        placed = facts(after).placements
        for layer, mod in moe_layers(after):
            for name, _ in mod.experts.named_parameters():
                if f"moe{layer}.experts.{name}" not in placed:
                    raise AssertionError(f"expert parameter moe{layer}.experts.{name} has no placement record")


EXPERT_PARALLEL = ExpertParallel()


class _Layer:
    """The rewrite of one MoE layer (per-call state of the pass)."""

    def __init__(self, gm, ctx, layer, lp, mod: MoELayer, placements):
        self.gm, self.ctx, self.layer, self.lp, self.mod = gm, ctx, layer, lp, mod
        self.placements = placements
        self.rank = ctx.rank
        self.resolved = ctx.resolved
        self.tp = ctx.resolved.tp if ctx.resolved.coordinated else 1
        self.ep_name = lp.group_names["ep"]
        node = lambda role: next(n for n in gm.graph.nodes  # noqa: E731
                                 if n.meta.get(M.ROLE) == role and n.meta.get(M.LAYER) == layer)
        self.dispatch, self.experts, self.combine = node("dispatch"), node("experts"), node("combine")
        self.impl = self.dispatch.kwargs.get("impl", "auto")

    # -- parameters -----------------------------------------------------------------------------
    def _place_experts(self) -> None:
        lp, mod, rank = self.lp, self.mod, self.rank
        mine = lp.experts_of(rank)
        full = mod.experts
        experts = full.select(mine.start, mine.stop)
        if lp.expert_slicing > 1:
            if not full.sliceable:
                raise PlanError(f"MoE layer {self.layer}: ep = {lp.ep} > {lp.experts} experts needs expert slicing, "
                                f"but this layer's FFN is not elementwise over its inner size (it has inner matrices "
                                f"or a norm / softmax over f), so it cannot be split exactly: give it an ep that "
                                f"divides {lp.experts}")
            experts = experts.slice_inner(lp.slice_of(rank), lp.expert_slicing)
        self.gm.add_submodule(f"moe{self.layer}", mod.replaced(experts=experts))
        divisor = self.resolved.expert_grad_divisor()
        names = lp.group_names
        for pname, p in experts.named_parameters():
            gname = f"moe{self.layer}.experts.{pname}"
            gshape = tuple(dict(full.named_parameters())[pname].shape)
            offsets = [0] * p.dim()
            offsets[0] = mine.start
            shards = [Shard(names["ep"], 0)] if lp.ep > 1 else []
            counts_ = True
            inner = experts.inner_dim(pname)
            if lp.expert_slicing > 1:
                if inner is not None:
                    offsets[inner] = lp.slice_of(rank) * p.shape[inner]
                    shards.append(Shard(names["expert_slice"], inner))
                else:
                    counts_ = lp.slice_of(rank) == 0   # the down bias: whole on every slice, slice 0's counts
            self.placements[gname] = Placement(
                gname, gshape, tuple(offsets), tuple(shards), replicated_over=names["edp"], grad_divisor=divisor,
                copies=lp.edp, counts=counts_)

    # -- graph ----------------------------------------------------------------------------------
    def _a2a(self, b: NodeBuilder, x, out_splits, in_splits, step: str, source: fx.Node) -> fx.Node:
        """An all-to-all over the layer's EP group; `source` is the node whose value the hierarchical pass
        derives its splits from (an Exchange, or the even splits of a capacity layer)."""
        node = b.fn(C.ALL_TO_ALL, x, out_splits, in_splits, self.ep_name, role="collective", group=self.ep_name)
        node.meta[M.A2A] = step
        node.meta[SPLITS_SOURCE] = source.name
        return node

    def rewrite(self) -> None:
        self._place_experts()
        lp = self.lp
        if lp.ep == 1 and self.tp == 1:
            return
        if self.mod.gate.drop_tokens:
            self._capacity()
        else:
            self._dropless()

    def _capacity(self) -> None:
        """[E, C, d] buffer: split its slots over TP ranks (coordinated), even all-to-alls, gather back."""
        lp, tp, gm = self.lp, self.tp, self.gm
        buf = self.dispatch
        b = NodeBuilder(gm.graph, self.dispatch, NAME, self.layer, self.dispatch.meta.get(M.BLOCK))
        full_c = b.fn(_size, buf, 1, role="layout")
        if tp > 1:
            buf = b.fn(C.TP_SPLIT, buf, 1, TP, tp, role="collective", group=TP)
        x = buf
        n_local = lp.experts_per_rank
        if lp.ep > 1:
            splits = b.fn(L.capacity_splits, buf, lp.ep, lp.expert_slicing, role="layout")
            rows = b.fn(L.capacity_send, buf, lp.expert_slicing, role="layout")
            x = self._a2a(b, rows, splits, splits, "dispatch", splits)
            x = b.fn(L.capacity_local, x, lp.ep, n_local, role="layout")
        self.experts.args = (x,)
        b.cursor = self.experts
        y = self.experts
        if lp.ep > 1:
            y = b.fn(L.capacity_unlocal, y, lp.ep, role="layout")
            y = self._a2a(b, y, splits, splits, "combine", splits)
            y = b.fn(L.capacity_unpack, y, self.mod.num_experts, lp.expert_slicing, role="layout")
        if tp > 1:
            y = b.fn(C.TP_GATHER, y, 1, TP, tp, full_c, role="collective", group=TP)
        self.experts.replace_all_uses_with(y, delete_user_cb=lambda u: u is self.combine)

    def _dropless(self) -> None:
        """Rows sorted by expert, exact uneven all-to-alls from the gathered count matrix."""
        lp, tp, gm, impl = self.lp, self.tp, self.gm, self.impl
        tokens, routing = self.dispatch.args[:2]
        b = NodeBuilder(gm.graph, self.dispatch, NAME, self.layer, self.dispatch.meta.get(M.BLOCK))
        expert, slot, weight, _, counts = (b.fn(operator.getitem, routing, i, role="layout") for i in range(5))
        zero = b.fn(L.zeros_like_expert, expert, role="layout")
        total = b.fn(L.total_rows, expert, role="layout")
        rows_n = b.fn(_numel, expert, role="layout")
        sslot = b.fn(L.sorted_slots, expert, slot, counts, role="layout")
        flat = b.fn(dispatch_rows, tokens, zero, sslot, total, 1, rows_n, impl, role="dispatch")
        flat.meta[M.IMPL] = impl
        rows = b.fn(L.flat_rows, flat, role="layout")
        mine_counts = counts
        if tp > 1:
            rows = b.fn(C.TP_SPLIT, rows, 0, TP, tp, role="collective", group=TP)
            mine_counts = b.fn(L.counts_in_chunk, counts, rows_n, tp, self.resolved.tp_rank(self.rank), role="layout")
        mine_n = b.fn(_size, rows, 0, role="layout")
        matrix = b.fn(_unsqueeze0, mine_counts, role="layout")
        if lp.ep > 1:
            matrix = b.fn(C.ALL_GATHER_ROWS, matrix, self.ep_name, lp.ep, role="collective", group=self.ep_name)
            matrix.meta[M.A2A] = "counts"
        ep_rank = lp.ep_rank(self.rank)
        xc = b.fn(L.exchange, matrix, ep_rank, lp.experts_per_rank, lp.expert_slicing, role="layout")
        x = b.fn(L.send_rows, rows, mine_counts, lp.expert_slicing, xc, role="layout")
        if lp.ep > 1:
            recv_s = b.fn(L.field, xc, "recv", role="layout")
            send_s = b.fn(L.field, xc, "send", role="layout")
            x = self._a2a(b, x, recv_s, send_s, "dispatch", xc)
        table = b.fn(L.local_table, matrix, ep_rank, lp.experts_per_rank, lp.expert_slicing, xc, role="layout")
        le, ls, lc = (b.fn(operator.getitem, table, i, role="layout") for i in range(3))
        cap = b.fn(L.field, xc, "local_max", role="layout")
        n_local = lp.experts_per_rank if lp.expert_slicing == 1 else 1
        buf = b.fn(dispatch_rows, x, le, ls, lc, n_local, cap, impl, role="layout")
        self.experts.args = (buf,)
        b.cursor = self.experts
        y = b.fn(combine_rows, self.experts, le, ls, lc, None, impl, role="layout")
        if lp.ep > 1:
            y = self._a2a(b, y, send_s, recv_s, "combine", xc)
        y_rows = b.fn(L.unsend_rows, y, mine_counts, lp.expert_slicing, xc, mine_n, role="layout")
        if tp > 1:
            y_rows = b.fn(C.TP_GATHER, y_rows, 0, TP, tp, rows_n, role="collective", group=TP)
        y_flat = b.fn(L.unflat_rows, y_rows, role="layout")
        out = b.fn(combine_rows, y_flat, zero, sslot, total, weight, impl, role="combine")
        out.meta[M.IMPL] = impl
        self.combine.replace_all_uses_with(out)
        gm.graph.erase_node(self.combine)
        gm.graph.erase_node(self.dispatch)


def _size(t, dim):
    return t.shape[dim]


def _numel(t):
    return t.numel()


def _unsqueeze0(t):
    return t.unsqueeze(0)
