"""Partition: from a converted graph, build one rank's graph with explicit collective nodes.

Runs after pr_moe / shrink / lower_gating; hierarchical_a2a runs after it. Needs the resolved
parallel degrees (`moefx.runtime.mesh.validate_parallel`) and this rank's process groups
(`build_groups`; without them the collectives carry only group names, enough for dumps).

Per MoE layer with ep > 1 (experts by EP rank, expert slicing when ep > E):

    rows  = ep_pack(buf)                       send  = ep_send_counts(buf)
    recv  = moe{L}.a2a_counts(send, rows)      count exchange (ints)   [ep group]
    x     = moe{L}.a2a_dispatch(rows, send, recv)                      [ep group]
    y     = moe{L}.experts(ep_to_expert_major(x, recv))   this rank's experts only
    back  = moe{L}.a2a_combine(ep_from_expert_major(y, recv), recv, send)   [ep group]
    y_buf = ep_unpack(back, buf)

The gate gets the EP group so a dropless capacity is agreed (all-reduce MAX) across it.
With tp > 1 every dense FFN (dense blocks and PR-MoE residual MLPs) is split Megatron-style:
ups column-parallel (after `tp_copy`: identity forward, all-reduce backward), down row-parallel
followed by `tp_reduce` (all-reduce forward) and then the down bias; every sdpa attention whose
head layout `moefx.analysis.attention` understands is split by heads: q/k/v projections
column-parallel (a fused qkv projection chunk by chunk), the head-sized constants of its views /
expands / splits divided by tp, a per-head mask sliced, the output projection row-parallel.
Attention it does not understand stays replicated (with a warning, listed in
meta["moefx_tp_replicated_attention"]). Data parallelism needs no forward change; gradients are
reduced by `moefx.runtime.grads.reduce_gradients`.
"""
from __future__ import annotations

import warnings

from torch import fx, nn

from .. import meta as M
from ..analysis.attention import find_attention, reaches
from ..analysis.ffn import find_ffns
from ..analysis.linear import attr_value, aten, linear_info, packet, val
from ..nn.moe import MoELayer, moe_layers
from ..runtime.collectives import AllToAll, CopyToTP, CountExchange, ReduceFromTP
from ..runtime.expert_parallel import ep_from_expert_major, ep_pack, ep_send_counts, ep_to_expert_major, ep_unpack
from .infra import NodeBuilder, copy_graph_module

NAME = "partition"


class Partition:
    """The partition pass for one rank: `Partition(rank, resolved, groups)(gm, plan)`."""

    name = NAME

    def __init__(self, rank: int, resolved, groups=None):
        self.rank, self.resolved, self.groups = rank, resolved, groups

    def __call__(self, gm: fx.GraphModule, plan) -> fx.GraphModule:
        new = copy_graph_module(gm)
        counts: dict[str, int] = {}
        self.shards: dict[str, tuple[str, int, int, int, tuple[int, ...]]] = {}
        for index, (layer, mod) in enumerate(moe_layers(new)):
            self._expert_parallel(new, layer, index, mod, counts)
        if self.resolved.tp > 1:
            self._tensor_parallel(new, counts)
        new.meta["moefx_collectives"] = counts
        new.meta["moefx_shards"] = dict(self.shards)
        _drop_unreferenced(new, {target for target, *_ in self.shards.values()})
        new.meta["moefx_rank"] = self.rank
        new.meta["moefx_parallel"] = self.resolved
        new.graph.eliminate_dead_code()
        new.recompile()
        return new

    # -- groups -------------------------------------------------------------------------------
    def _layer_group(self, index: int, role: str):
        """(process group or None without groups, name) of MoE layer `index`'s group `role`."""
        name = self.resolved.layers[index].group_names[role]
        return (getattr(self.groups.layer(index), role) if self.groups is not None else None), name

    def _group(self, name: str):
        return (self.groups.group(name) if self.groups is not None else None), name

    # -- expert parallelism ---------------------------------------------------------------------
    def _expert_parallel(self, gm: fx.GraphModule, layer: int, index: int, mod: MoELayer, counts) -> None:
        lp = self.resolved.layers[index]
        if lp.experts != mod.num_experts:
            raise ValueError(f"MoE layer {layer} has {mod.num_experts} experts but the parallel plan was "
                             f"resolved for {lp.experts}")
        ep_group, ep_name = self._layer_group(index, "ep")
        mine = lp.experts_of(self.rank)
        experts = mod.experts.select(mine.start, mine.stop)
        if lp.expert_slicing > 1:
            experts = experts.slice_inner(lp.slice_of(self.rank), lp.expert_slicing)
        children = {"gate": mod.gate.with_options(ep_group=ep_group if lp.ep > 1 else None), "experts": experts}
        if lp.ep > 1:
            children.update(a2a_counts=CountExchange(ep_group, ep_name), a2a_dispatch=AllToAll(ep_group, ep_name),
                            a2a_combine=AllToAll(ep_group, ep_name))
        gm.add_submodule(f"moe{layer}", mod.replaced(**children))
        if lp.ep == 1:
            return

        node = next(n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "experts" and n.meta.get(M.LAYER) == layer)
        buf = node.args[0]
        s, epr = lp.expert_slicing, lp.experts_per_rank
        b = NodeBuilder(gm.graph, node.prev, NAME, layer, node.meta.get(M.BLOCK))
        rows = b("call_function", ep_pack, (buf, s), role="layout")
        send = b("call_function", ep_send_counts, (buf, lp.ep, s), role="layout")
        recv = b("call_module", f"moe{layer}.a2a_counts", (send, rows), role="collective")
        x = b("call_module", f"moe{layer}.a2a_dispatch", (rows, send, recv), role="collective")
        local_buf = b("call_function", ep_to_expert_major, (x, recv, epr), role="layout")
        node.args = (local_buf,)
        b.cursor = node
        y_rows = b("call_function", ep_from_expert_major, (node, recv, epr), role="layout")
        back = b("call_module", f"moe{layer}.a2a_combine", (y_rows, recv, send), role="collective")
        out = b("call_function", ep_unpack, (back, buf, s), role="layout")
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not y_rows)
        for n, direction in ((recv, "counts"), (x, "dispatch"), (back, "combine")):
            n.meta[M.GROUP] = ep_name
            n.meta["moefx_a2a"] = direction
            counts[ep_name] = counts.get(ep_name, 0) + 1

    # -- tensor parallelism ---------------------------------------------------------------------
    def _tensor_parallel(self, gm: fx.GraphModule, counts) -> None:
        tp = self.resolved.tp
        group, name = self._group("tp")
        gm.add_module("tp_copy", CopyToTP(group, name))
        gm.add_module("tp_reduce", ReduceFromTP(group, name))
        by_name = {n.name: n for n in gm.graph.nodes}
        attentions = find_attention(gm)  # before any rewrite: the analysis reads shape metadata
        for ffn in find_ffns(gm):
            if ffn.f % tp:
                raise ValueError(f"block {ffn.block}: FFN inner size {ffn.f} is not divisible by tp = {tp}")
            region = {by_name[n] for n in ffn.nodes}
            ups = [linear_info(by_name[up]) for up in ffn.ups]
            down = linear_info(by_name[ffn.down])
            x = by_name[ffn.input]
            cp = self._copy_to_tp(gm, x, ffn.block)
            x.replace_all_uses_with(cp, delete_user_cb=lambda u: u in region)
            for info in ups:
                self._column(gm, info, chunks=1)
            part = ffn.f // tp
            for node in [by_name[m] for m in ffn.middle] + [u for u in down.node.users if u in region]:
                if packet(node) in (aten.view, aten.reshape, aten._unsafe_view):
                    node.args = (node.args[0], _scale_last(node.args[1], ffn.f, part), *node.args[2:])
            self._row(gm, down, ffn.block)
            counts[name] = counts.get(name, 0) + 2  # tp_copy (backward all-reduce) + tp_reduce
        skipped = []
        for att in attentions:
            if not att.supported:
                skipped.append(f"{att.sdpa.name}: {att.reason}")
                continue
            counts[name] = counts.get(name, 0) + self._attention(gm, att)
        if skipped:
            warnings.warn("tensor parallelism keeps these attention layers replicated (their head layout is not "
                          "understood): " + "; ".join(skipped), stacklevel=3)
        gm.meta["moefx_tp_replicated_attention"] = skipped

    def _copy_to_tp(self, gm: fx.GraphModule, x: fx.Node, block) -> fx.Node:
        b = NodeBuilder(gm.graph, x, NAME, block=block)
        cp = b("call_module", "tp_copy", (x,), role="collective")
        cp.meta[M.GROUP] = "tp"
        if "val" in x.meta:
            cp.meta["val"] = x.meta["val"]
        return cp

    def _column(self, gm: fx.GraphModule, info, chunks: int) -> None:
        """Column-parallel: keep this TP rank's part of each of `chunks` equal chunks of the output."""
        tp, r = self.resolved.tp, self.resolved.tp_rank(self.rank)
        width = info.out_features // chunks
        if width % tp:
            raise ValueError(f"{info.node.name}: output width {width} is not divisible by tp = {tp}")
        ranges = [(c * width + r * width // tp, c * width + (r + 1) * width // tp) for c in range(chunks)]
        dim = 0 if info.transposed else 1
        self._shard(gm, info.weight, dim, ranges)
        if info.bias is not None:
            self._shard(gm, info.bias, 0, ranges)

    def _row(self, gm: fx.GraphModule, info, block) -> None:
        """Row-parallel: this rank's rows of the input dim, all-reduce, then the (unsplit) bias.

        `info` is the linear's LinearInfo, taken before the graph was rewritten."""
        tp, r = self.resolved.tp, self.resolved.tp_rank(self.rank)
        node = info.node
        lo, hi = r * info.in_features // tp, (r + 1) * info.in_features // tp
        self._shard(gm, info.weight, 1 if info.transposed else 0, [(lo, hi)])
        bias = info.bias
        if bias is not None:
            if packet(node) is aten.addmm:
                with gm.graph.inserting_after(node):
                    mm = gm.graph.call_function(aten.mm.default, (node.args[1], node.args[2]))
                mm.meta = dict(node.meta)
                node.replace_all_uses_with(mm)
                gm.graph.erase_node(node)
                node = mm
            else:
                node.args = node.args[:2]
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        b = NodeBuilder(gm.graph, node, NAME, block=block)
        red = b("call_module", "tp_reduce", (node,), role="collective")
        red.meta[M.GROUP] = "tp"
        out = b("call_function", aten.add.Tensor, (red, bias), role="collective") if bias is not None else red
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not red)

    def _attention(self, gm: fx.GraphModule, att) -> int:
        """Split heads over the TP group: q/k/v column-parallel, output projection row-parallel.
        Returns the number of TP collectives inserted."""
        tp, r = self.resolved.tp, self.resolved.tp_rank(self.rank)
        kv_heads = val(att.sdpa.args[1]).shape[-3]
        if att.heads % tp or kv_heads % tp:
            raise ValueError(f"{att.sdpa.name}: {att.heads} query / {kv_heads} key-value heads are not divisible "
                             f"by tp = {tp}")
        infos = {p: linear_info(p) for p in att.projections}
        out_info = linear_info(att.out_proj)
        for p, info in infos.items():
            splits = [n for n in att.flags if packet(n) in (aten.split, aten.split_with_sizes)
                      and att.flags[n.args[0]][_dim(n)] and reaches(n, {p})]
            chunks = len(val_list(splits[0])) if splits else 1
            self._column(gm, info, chunks)
        for n in list(att.flags):
            p = packet(n)
            if p in (aten.view, aten.reshape, aten._unsafe_view, aten.expand):
                n.args = (n.args[0], _scale_flagged(n, n.args[1], att.flags[n], tp), *n.args[2:])
            elif p is aten.split and att.flags[n.args[0]][_dim(n)]:
                n.args = (n.args[0], n.args[1] // tp, *n.args[2:])
            elif p is aten.split_with_sizes and att.flags[n.args[0]][_dim(n)]:
                n.args = (n.args[0], [s // tp for s in n.args[1]], *n.args[2:])
        extra = 0
        mask = att.sdpa.args[3] if len(att.sdpa.args) > 3 else att.sdpa.kwargs.get("attn_mask")
        mv = val(mask) if isinstance(mask, fx.Node) else None
        if mv is not None and mv.dim() == 4 and mv.shape[1] == att.heads and att.heads > 1:
            # A per-head mask (T5's position bias) keeps this rank's heads; tp_copy first so the
            # parameters it is computed from get the gradient of every head back.
            lo, hi = r * att.heads // tp, (r + 1) * att.heads // tp
            with gm.graph.inserting_before(att.sdpa):
                full = gm.graph.call_module("tp_copy", (mask,))
                sliced = gm.graph.call_function(aten.slice.Tensor, (full, 1, lo, hi))
            M.tag(full, NAME, "collective").meta[M.GROUP] = "tp"
            M.tag(sliced, NAME, "layout")
            extra = 1
            if len(att.sdpa.args) > 3:
                att.sdpa.args = (*att.sdpa.args[:3], sliced, *att.sdpa.args[4:])
            else:
                att.sdpa.kwargs = {**att.sdpa.kwargs, "attn_mask": sliced}
        for x in {info.x for info in infos.values()}:
            cp = self._copy_to_tp(gm, x, None)
            for p in infos:
                if p.args[1 if packet(p) is aten.addmm else 0] is x:
                    p.replace_input_with(x, cp)
        self._row(gm, out_info, None)
        return 1 + len({info.x for info in infos.values()}) + extra

    def _shard(self, gm: fx.GraphModule, attr_node: fx.Node, dim: int, ranges: list[tuple[int, int]]) -> None:
        """Point a get_attr node at this rank's part of a parameter: ranges [lo, hi) of `dim`.

        One range: a new parameter, recorded in gm.meta["moefx_shards"][name] =
        (target, dim, lo, hi, full shape of target).
        Several (a fused projection's chunks): one parameter per range, concatenated in the graph.
        """
        old = attr_value(gm, attr_node.target)
        base = "tp_shard_" + attr_node.target.replace(".", "_")
        targets = []
        for i, (lo, hi) in enumerate(ranges):
            target = base if len(ranges) == 1 else f"{base}_chunk{i}"
            if not hasattr(gm, target):
                shard = nn.Parameter(old.detach().narrow(dim, lo, hi - lo).clone(), requires_grad=old.requires_grad)
                gm.register_parameter(target, shard)
                self.shards[target] = (attr_node.target, dim, lo, hi, tuple(old.shape))
            targets.append(target)
        if len(targets) == 1:
            attr_node.target = targets[0]
            return
        parts, cursor = [], attr_node
        for t in targets:
            with gm.graph.inserting_after(cursor):
                cursor = gm.graph.get_attr(t)
            parts.append(cursor)
        with gm.graph.inserting_after(cursor):
            joined = gm.graph.call_function(aten.cat.default, (parts, dim))
        M.tag(joined, NAME, "layout")
        attr_node.replace_all_uses_with(joined)
        gm.graph.erase_node(attr_node)


def _drop_unreferenced(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the full-size originals that TP shards replaced (when no node reads them any more), so a
    rank holds only its shards."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - used:
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


def _dim(split: fx.Node) -> int:
    d = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    return d % val(split.args[0]).dim()


def val_list(split: fx.Node) -> list:
    """The outputs of a split node (its getitem users), one per chunk."""
    v = split.meta.get("val")
    return list(v) if isinstance(v, (list, tuple)) else [u for u in split.users]


def _scale_flagged(node: fx.Node, shape, flags: tuple[bool, ...], tp: int):
    """A view/expand shape with every head-scaled literal size divided by tp."""
    if not isinstance(shape, (list, tuple)):
        return shape
    out = list(shape)
    offset = len(flags) - len(out)
    for i, s in enumerate(out):
        if flags[i + offset] and isinstance(s, int) and s > 0:
            out[i] = s // tp
        elif flags[i + offset] and isinstance(s, fx.Node):
            raise ValueError(f"{node.name}: a head-scaled size is a symbolic expression ({s.name})")
    return type(shape)(out)


def _scale_last(shape, full: int, part: int):
    """A view's shape argument with a last entry of `full` replaced by `part`."""
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) and shape[-1] == full:
        return type(shape)([*shape[:-1], part])
    return shape


def partition(gm: fx.GraphModule, plan, *, rank: int, resolved, groups=None) -> fx.GraphModule:
    """Functional form of `Partition`: this rank's GraphModule."""
    return Partition(rank, resolved, groups)(gm, plan)

