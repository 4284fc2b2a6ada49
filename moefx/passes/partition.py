"""Partition: from a converted graph, build one rank's graph with explicit collective nodes.

Runs after pr_moe / shrink / lower_gating; hierarchical_a2a runs after it. Needs the resolved
parallel degrees (`moefx.runtime.mesh.validate_parallel`) and this rank's process groups
(`build_groups`; without them the collectives carry only group names, enough for dumps).

Per MoE layer with ep > 1 (experts by EP rank, expert slicing when ep > E):

    rows  = ep_pack(buf)                       send  = ep_send_counts(buf)
    recv  = moe{L}.a2a_counts(send)            count exchange          [ep group]
    x     = moe{L}.a2a_dispatch(rows, send, recv)                      [ep group]
    y     = moe{L}.experts(ep_to_expert_major(x, recv))   this rank's experts only
    back  = moe{L}.a2a_combine(ep_from_expert_major(y, recv), recv, send)   [ep group]
    y_buf = ep_unpack(back, buf)

The gate gets the EP group so a dropless capacity is agreed (all-reduce MAX) across it.
With tp > 1 every dense FFN (dense blocks and PR-MoE residual MLPs) is split Megatron-style:
ups column-parallel (after `tp_copy`: identity forward, all-reduce backward), down row-parallel
followed by `tp_reduce` (all-reduce forward) and then the down bias. Attention stays replicated
inside a TP group (not split) and data parallelism needs no forward change; gradients are
reduced by `moefx.runtime.grads.reduce_gradients`.
"""
from __future__ import annotations

import copy

from torch import fx, nn

from .. import meta as M
from ..analysis.ffn import find_ffns
from ..analysis.linear import aten, is_view, linear_info, packet
from ..nn.moe import MoELayer
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
        new, _ = copy_graph_module(gm)
        counts: dict[str, int] = {}
        self.shards: dict[str, tuple[str, int, int, int]] = {}
        layers = sorted(((int(n.removeprefix("moe")), m) for n, m in new.named_children()
                         if isinstance(m, MoELayer)), key=lambda t: t[0])
        for index, (layer, mod) in enumerate(layers):
            self._expert_parallel(new, layer, index, mod, counts)
        if self.resolved.tp > 1:
            self._tensor_parallel(new, counts)
        new.meta["moefx_collectives"] = counts
        new.meta["moefx_shards"] = dict(self.shards)
        new.meta["moefx_rank"] = self.rank
        new.meta["moefx_parallel"] = self.resolved
        new.graph.eliminate_dead_code()
        new.recompile()
        return new

    # -- groups -------------------------------------------------------------------------------
    def _layer_group(self, index: int, key: str):
        lp = self.resolved.layers[index]
        names = {"ep": f"ep{lp.ep}", "edp": f"edp{lp.ep}"}
        if self.groups is None:
            return None, names[key]
        lg = self.groups.layer(index)
        return getattr(lg, key), lg.names[key]

    def _group(self, name: str):
        return (self.groups.group(name) if self.groups is not None else None), name

    # -- expert parallelism ---------------------------------------------------------------------
    def _expert_parallel(self, gm: fx.GraphModule, layer: int, index: int, mod: MoELayer, counts) -> None:
        lp = self.resolved.layers[index]
        if lp.experts != mod.num_experts:
            raise ValueError(f"MoE layer {layer} has {mod.num_experts} experts but the parallel plan was "
                             f"resolved for {lp.experts}")
        ep_group, ep_name = self._layer_group(index, "ep")
        local = copy.copy(mod)
        local._modules = dict(mod._modules)
        gate = copy.copy(mod.gate)
        gate.ep_group = ep_group if lp.ep > 1 else None
        local._modules["gate"] = gate
        experts = mod.experts
        mine = lp.experts_of(self.rank)
        experts = experts.select(mine.start, mine.stop)
        if lp.expert_slicing > 1:
            experts = experts.slice_inner(lp.slice_of(self.rank), lp.expert_slicing)
        local._modules["experts"] = experts
        gm.add_submodule(f"moe{layer}", local)
        if lp.ep == 1:
            return
        local._modules["a2a_counts"] = CountExchange(ep_group, ep_name)
        local._modules["a2a_dispatch"] = AllToAll(ep_group, ep_name)
        local._modules["a2a_combine"] = AllToAll(ep_group, ep_name)

        node = next(n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "experts" and n.meta.get(M.LAYER) == layer)
        buf = node.args[0]
        s, epr = lp.expert_slicing, lp.experts_per_rank
        b = NodeBuilder(gm.graph, node.prev, NAME, layer, node.meta.get(M.BLOCK))
        rows = b("call_function", ep_pack, (buf, s), role="layout")
        send = b("call_function", ep_send_counts, (buf, lp.ep, s), role="layout")
        recv = b("call_module", f"moe{layer}.a2a_counts", (send,), role="collective")
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
        tp, r = self.resolved.tp, self.resolved.tp_rank(self.rank)
        group, name = self._group("tp")
        gm.add_module("tp_copy", CopyToTP(group, name))
        gm.add_module("tp_reduce", ReduceFromTP(group, name))
        by_name = {n.name: n for n in gm.graph.nodes}
        for ffn in find_ffns(gm):
            if ffn.f % tp:
                raise ValueError(f"block {ffn.block}: FFN inner size {ffn.f} is not divisible by tp = {tp}")
            lo, hi = r * ffn.f // tp, (r + 1) * ffn.f // tp
            region = {by_name[n] for n in ffn.nodes}
            up_infos = [linear_info(by_name[up]) for up in ffn.ups]
            down_info = linear_info(by_name[ffn.down])
            x = by_name[ffn.input]
            b = NodeBuilder(gm.graph, x, NAME, block=ffn.block)
            cp = b("call_module", "tp_copy", (x,), role="collective")
            cp.meta[M.GROUP] = name
            if "val" in x.meta:
                cp.meta["val"] = x.meta["val"]
            x.replace_all_uses_with(cp, delete_user_cb=lambda u: u in region)
            for info in up_infos:
                self._shard(gm, info.weight, dim=0 if info.transposed else 1, lo=lo, hi=hi)
                if info.bias is not None:
                    self._shard(gm, info.bias, dim=0, lo=lo, hi=hi)
            for m in ffn.middle:
                node = by_name[m]
                if is_view(node) or packet(node) in (aten.view, aten.reshape, aten._unsafe_view):
                    node.args = (node.args[0], _scale_last(node.args[1], ffn.f, hi - lo), *node.args[2:])
            down = by_name[ffn.down]
            info = down_info
            self._shard(gm, info.weight, dim=1 if info.transposed else 0, lo=lo, hi=hi)
            for user in list(down.users):
                if is_view(user) and user in region:
                    user.args = (user.args[0], _scale_last(user.args[1], ffn.f, hi - lo), *user.args[2:])
            bias = info.bias
            if bias is not None:
                if packet(down) is aten.addmm:
                    with gm.graph.inserting_after(down):
                        mm = gm.graph.call_function(aten.mm.default, (down.args[1], down.args[2]))
                    mm.meta = dict(down.meta)
                    down.replace_all_uses_with(mm)
                    gm.graph.erase_node(down)
                    down = mm
                else:
                    down.args = down.args[:2]
                    down.kwargs = {k: v for k, v in down.kwargs.items() if k != "bias"}
            b = NodeBuilder(gm.graph, down, NAME, block=ffn.block)
            red = b("call_module", "tp_reduce", (down,), role="collective")
            red.meta[M.GROUP] = name
            out = b("call_function", aten.add.Tensor, (red, bias), role="collective") if bias is not None else red
            down.replace_all_uses_with(out, delete_user_cb=lambda u: u is not red)
            counts[name] = counts.get(name, 0) + 2  # tp_copy (backward all-reduce) + tp_reduce

    def _shard(self, gm: fx.GraphModule, attr_node: fx.Node, dim: int, lo: int, hi: int) -> None:
        """Point a get_attr node at a new parameter holding slice [lo, hi) of `dim` of the old one.

        Recorded in gm.meta["moefx_shards"][new_name] = (original target, dim, lo, hi)."""
        old = gm
        for part in attr_node.target.split("."):
            old = getattr(old, part)
        shard = nn.Parameter(old.detach().narrow(dim, lo, hi - lo).clone(), requires_grad=old.requires_grad)
        target = "tp_shard_" + attr_node.target.replace(".", "_")
        if not hasattr(gm, target):
            gm.register_parameter(target, shard)
            self.shards[target] = (attr_node.target, dim, lo, hi)
        attr_node.target = target


def _scale_last(shape, full: int, part: int):
    """A view's shape argument with a last entry of `full` replaced by `part`."""
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) and shape[-1] == full:
        return type(shape)([*shape[:-1], part])
    return shape


def partition(gm: fx.GraphModule, plan, *, rank: int, resolved, groups=None) -> fx.GraphModule:
    """Functional form of `Partition`: this rank's GraphModule."""
    return Partition(rank, resolved, groups)(gm, plan)

