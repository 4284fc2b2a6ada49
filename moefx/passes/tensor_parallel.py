"""Tensor parallelism: split dense FFNs and attention Megatron-style over the TP group.

Runs after expert_parallel in stage "distribute", when the plan's tp > 1. Requires nothing of
the earlier passes (a dense model splits too). Needs `ctx.rank` and the resolved degrees.

- Every dense FFN whose middle is elementwise over its inner size f (dense blocks and the PR-MoE
  residual MLPs; GELU, ReLU, SwiGLU, ...): ups column-parallel after `tp_copy` (identity
  forward, all-reduce backward), down row-parallel followed by `tp_reduce` (all-reduce forward)
  and then the down bias. FFNs with inner matrices or a norm / softmax over f cannot be split
  exactly: they stay replicated, with a warning (listed in `facts(gm).tp_replicated`).
- Every sdpa attention whose head layout `moefx.analysis.attention` understands is split by
  heads: q/k/v projections column-parallel (a fused qkv projection chunk by chunk), a static
  KV cache's buffers to this rank's heads, the
  head-sized constants of its views / expands / splits divided by tp, a per-head mask sliced
  (T5's position bias, after a `tp_copy` so its parameters get every head's gradient), the
  output projection row-parallel. Attention it does not understand, or whose query / key-value
  head counts tp does not divide, stays replicated, with a warning.

Every shard is a new parameter `tp_shard_<target>[_chunkN]` with a placement record (global
tensor, offsets, sharded over "tp", copies over "dp"); the full-size originals are removed, so a
rank holds only its shards.
"""
from __future__ import annotations

import warnings

from torch import fx, nn

from .. import meta as M
from ..analysis.attention import CACHE_UPDATES, find_attention, head_count, reaches
from ..analysis.ffn import find_ffns
from ..analysis.linear import aten, attr_value, linear_info, packet, val
from ..facts import facts, record_facts
from ..nn import collectives as C
from ..parallel import DP, TP
from ..placement import Placement, Shard, complete
from ..tensors import owner_of
from .base import Pass, PassContext
from .graph import NodeBuilder, copy_graph_module, drop_unused_attributes

NAME = "tensor_parallel"


class TensorParallel(Pass):
    """Split dense FFNs and attention over the TP group (see the module docstring)."""

    name = NAME
    stage = "distribute"

    def applies(self, ctx: PassContext) -> bool:
        return ctx.plan.parallel is not None and ctx.plan.parallel.tp > 1

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        new = copy_graph_module(gm)
        split = _Split(new, ctx)
        split.run()
        drop_unused_attributes(new)
        new.graph.eliminate_dead_code()
        record_facts(new, tp_replicated=tuple(split.skipped), rank=ctx.rank, parallel=ctx.resolved,
                     placements=complete(new, split.placements, ctx.resolved))
        return new

    def ensures(self, before, after, ctx) -> None:
        state = dict(after.named_parameters())
        state.update(after.named_buffers())
        for name, p in facts(after).placements.items():
            if TP in p.sharded_over and name not in state:
                raise AssertionError(f"TP shard {name} has a placement record but no tensor")
        for target in {p.global_name for n, p in facts(after).placements.items() if TP in p.sharded_over}:
            if target in state:
                raise AssertionError(f"the full-size original {target} of a TP shard is still in the rank's model")


TENSOR_PARALLEL = TensorParallel()


class _Split:
    """The rewrite of one graph (per-call state of the pass)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.gm, self.ctx = gm, ctx
        self.tp = ctx.resolved.tp
        self.r = ctx.resolved.tp_rank(ctx.rank)
        self.dp = ctx.resolved.dp
        self.grad_divisor = ctx.resolved.dense_grad_divisor
        self.placements: dict[str, Placement] = dict(facts(gm).placements)
        self.skipped: list[str] = []

    def run(self) -> None:
        gm = self.gm
        by_name = {n.name: n for n in gm.graph.nodes}
        attentions = find_attention(gm)  # before any rewrite: the analysis reads shape metadata
        for ffn in find_ffns(gm):
            if not ffn.elementwise:
                self.skipped.append(f"FFN of block {ffn.block}: its middle is not elementwise over f (inner "
                                    "matrices, or a norm / softmax over f)")
                continue
            if ffn.f % self.tp:
                self.skipped.append(f"FFN of block {ffn.block}: inner size {ffn.f} is not divisible by tp = {self.tp}")
                continue
            self._ffn(by_name, ffn)
        for att in attentions:
            name = f"attention {att.core.name} ({att.kind})"
            if not att.supported:
                self.skipped.append(f"{name}: {att.reason}")
                continue
            why = self._unsplittable(att)
            if why:
                self.skipped.append(f"{name}: {why}")
                continue
            self._attention(att)
        if self.skipped:
            warnings.warn("tensor parallelism keeps these layers replicated: " + "; ".join(self.skipped),
                          stacklevel=4)

    # -- FFNs -------------------------------------------------------------------------------------
    def _ffn(self, by_name: dict, ffn) -> None:
        region = {by_name[n] for n in ffn.nodes}
        ups = [linear_info(by_name[up]) for up in ffn.ups]
        down = linear_info(by_name[ffn.down])
        x = by_name[ffn.input]
        cp = self._copy_to_tp(x, ffn.block)
        x.replace_all_uses_with(cp, delete_user_cb=lambda u: u in region)
        for info in ups:
            self._column(info, chunks=1)
        part = ffn.f // self.tp
        for node in [by_name[m] for m in ffn.middle] + [u for u in down.node.users if u in region]:
            if packet(node) in (aten.view, aten.reshape, aten._unsafe_view):
                node.args = (node.args[0], _scale_last(node.args[1], ffn.f, part), *node.args[2:])
        self._row(down, ffn.block)

    # -- collectives ------------------------------------------------------------------------------
    def _copy_to_tp(self, x: fx.Node, block) -> fx.Node:
        b = NodeBuilder(self.gm.graph, x, NAME, block=block)
        cp = b.fn(C.TP_COPY, x, TP, role="collective", group=TP)
        if "val" in x.meta:
            cp.meta["val"] = x.meta["val"]
        return cp

    def _column(self, info, chunks: int) -> None:
        """Column-parallel: keep this TP rank's part of each of `chunks` equal chunks of the output."""
        tp, r = self.tp, self.r
        width = info.out_features // chunks
        if width % tp:
            raise ValueError(f"{info.node.name}: output width {width} is not divisible by tp = {tp}")
        ranges = [(c * width + r * width // tp, c * width + (r + 1) * width // tp) for c in range(chunks)]
        self._shard(info.weight, 0 if info.transposed else 1, ranges)
        if info.bias is not None:
            self._shard(info.bias, 0, ranges)

    def _row(self, info, block) -> None:
        """Row-parallel: this rank's rows of the input dim, all-reduce, then the (unsplit) bias.

        `info` is the linear's LinearInfo, taken before the graph was rewritten."""
        gm, tp, r = self.gm, self.tp, self.r
        node = info.node
        lo, hi = r * info.in_features // tp, (r + 1) * info.in_features // tp
        self._shard(info.weight, 1 if info.transposed else 0, [(lo, hi)])
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
        red = b.fn(C.TP_REDUCE, node, TP, role="collective", group=TP)
        out = b.fn(aten.add.Tensor, red, bias, role="collective") if bias is not None else red
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not red)

    # -- attention --------------------------------------------------------------------------------
    def _kv_side(self, att) -> set:
        """Region nodes computed from the key / value projections only (empty when the key / value
        heads split over tp like the query heads)."""
        if att.kv_heads % self.tp == 0:
            return set()
        q_projs = {p for p in att.projections if reaches(att.q, {p})}
        return {n for n in att.flags if not reaches(n, q_projs)}

    def _unsplittable(self, att) -> str | None:
        """Why the heads of `att` cannot be split over tp (None: they can)."""
        tp = self.tp
        if att.heads % tp:
            return f"{att.heads} query heads are not divisible by tp = {tp}"
        if att.kv_heads % tp == 0:
            return None
        # fewer key / value heads than ranks: keep them whole on every rank (replicated), each rank
        # taking the ones its query heads read
        q_projs = {p for p in att.projections if reaches(att.q, {p})}
        if len(q_projs) != 1 or any(reaches(att.k, {p}) or reaches(att.v, {p}) for p in q_projs):
            return (f"{att.kv_heads} key-value heads are not divisible by tp = {tp} and q / k / v come from one "
                    "fused projection (they can only be replicated with separate projections)")
        if self._kv_range(att) is None:
            return (f"{att.heads} query / {att.kv_heads} key-value heads: the query heads of a rank do not map to "
                    f"whole key-value heads at tp = {tp}")
        return None

    def _kv_range(self, att) -> tuple[int, int] | None:
        """The key / value heads at the core this rank's query heads attend with, when they are replicated."""
        k_heads = head_count(att.k)
        per_rank = att.heads // self.tp
        lo = self.r * per_rank
        if k_heads == att.heads:                         # repeated to the query heads before the core
            return lo, lo + per_rank
        group = att.heads // k_heads                     # query heads per key-value head (GQA in the core)
        if group % per_rank == 0:
            return lo // group, lo // group + 1
        return None

    def _attention(self, att) -> None:
        """Split heads over the TP group: q/k/v column-parallel, output projection row-parallel.
        With fewer key / value heads than ranks the k / v projections stay whole (replicated; their
        outputs pass a tp_copy, so every rank's weight gradient sums every rank's heads) and the core
        reads this rank's slice of them."""
        tp, r = self.tp, self.r
        kv_side = self._kv_side(att)
        infos = {p: linear_info(p) for p in att.projections}
        out_info = linear_info(att.out_proj)
        split_projs = {p: info for p, info in infos.items() if p not in kv_side}
        for p, info in split_projs.items():
            splits = [n for n in att.flags if packet(n) in (aten.split, aten.split_with_sizes)
                      and att.flags[n.args[0]][_dim(n)] and reaches(n, {p})]
            chunks = len(_outputs(splits[0])) if splits else 1
            self._column(info, chunks)
        params = self._region_params(att, set(infos))
        for n in list(att.flags):
            if n in kv_side:
                continue
            p = packet(n)
            if p in CACHE_UPDATES and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
                # the KV cache buffer keeps this rank's heads, like the states written into it
                dim = att.flags[n].index(True)
                size = val(n).shape[dim]
                self._shard(n.args[0], dim, [(r * size // tp, (r + 1) * size // tp)])
                continue
            if p in (aten.view, aten.reshape, aten._unsafe_view, aten.expand):
                n.args = (n.args[0], _scale_flagged(n, n.args[1], att.flags[n], tp), *n.args[2:])
            elif p is aten.split and att.flags[n.args[0]][_dim(n)]:
                n.args = (n.args[0], n.args[1] // tp, *n.args[2:])
            elif p is aten.split_with_sizes and att.flags[n.args[0]][_dim(n)]:
                n.args = (n.args[0], [s // tp for s in n.args[1]], *n.args[2:])
            self._slice_per_head_inputs(att, n)
        for a in params:
            # a parameter the split heads read whole (a per-head q / k norm's weight): its gradient
            # is the sum over the ranks' heads
            cp = self._copy_to_tp(a, None)
            a.replace_all_uses_with(cp, delete_user_cb=lambda u: u is not cp and u in att.flags)
        if kv_side:
            lo, hi = self._kv_range(att)
            for operand in (att.k, att.v):
                self._slice_heads(att.core, operand, lo, hi)
            for p in infos:
                if p in kv_side:
                    cp = self._copy_to_tp(p, None)
                    p.replace_all_uses_with(cp, delete_user_cb=lambda u: u is not cp)
        xs = {info.x for p, info in split_projs.items()}
        for x in xs:
            cp = self._copy_to_tp(x, None)
            for p in split_projs:
                if p.args[1 if packet(p) is aten.addmm else 0] is x:
                    p.replace_input_with(x, cp)
        self._row(out_info, None)

    def _region_params(self, att, projections: set) -> list[fx.Node]:
        """Trainable get_attr nodes that split-head nodes read (not the projections' own weights)."""
        own = {a for p in projections for a in p.all_input_nodes if a.op == "get_attr"}
        out = []
        for n in att.flags:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in own and a not in out:
                    value = attr_value(self.gm, a.target)
                    if isinstance(value, nn.Parameter) and value.requires_grad and n not in projections:
                        out.append(a)
        return out

    def _slice_per_head_inputs(self, att, n: fx.Node) -> None:
        """Inputs of `n` outside the region that hold every head (a per-head mask or position bias) get
        this rank's heads, after a tp_copy (the parameters they come from get every head's gradient)."""
        if n.op != "call_function" or packet(n) in CACHE_UPDATES:
            return
        out_flags, out_val = att.flags[n], val(n)
        if out_val is None or True not in out_flags:
            return
        for a in list(n.all_input_nodes):
            av = val(a)
            if a in att.flags or a.op == "get_attr" or av is None or av.dim() == 0 or av.dim() > out_val.dim():
                continue
            offset = out_val.dim() - av.dim()
            axes = [d for d in range(av.dim()) if out_flags[d + offset] and isinstance(av.shape[d], int)
                    and av.shape[d] == att.heads and att.heads > 1]
            for d in axes:
                self._slice_heads(n, a, self.r * att.heads // self.tp, (self.r + 1) * att.heads // self.tp, dim=d,
                                  copy=True)

    def _slice_heads(self, user: fx.Node, operand: fx.Node, lo: int, hi: int, dim: int = -3,
                     copy: bool = False) -> None:
        """Make `user` read heads [lo, hi) of `operand` (along `dim`)."""
        gm = self.gm
        with gm.graph.inserting_before(user):
            src = operand
            if copy:
                src = gm.graph.call_function(C.TP_COPY, (operand, TP))
                M.tag(src, NAME, "collective").meta[M.GROUP] = TP
            sliced = gm.graph.call_function(aten.slice.Tensor, (src, dim % val(operand).dim(), lo, hi))
        M.tag(sliced, NAME, "layout")
        user.replace_input_with(operand, sliced)

    # -- parameters -------------------------------------------------------------------------------
    def _shard(self, attr_node: fx.Node, dim: int, ranges: list[tuple[int, int]]) -> None:
        """Point a get_attr node at this rank's part of a parameter: ranges [lo, hi) of `dim`.

        One range: a new parameter. Several (a fused projection's chunks): one parameter per range,
        concatenated in the graph. Each gets a placement record."""
        gm = self.gm
        old = attr_value(gm, attr_node.target)
        base = "tp_shard_" + attr_node.target.replace(".", "_")
        targets = []
        for i, (lo, hi) in enumerate(ranges):
            target = base if len(ranges) == 1 else f"{base}_chunk{i}"
            if not hasattr(gm, target):
                piece = old.detach().narrow(dim, lo, hi - lo).clone()
                if isinstance(old, nn.Parameter):
                    gm.register_parameter(target, nn.Parameter(piece, requires_grad=old.requires_grad))
                else:
                    gm.register_buffer(target, piece, persistent=not _non_persistent(gm, attr_node.target))
                offsets = [0] * old.dim()
                offsets[dim] = lo
                self.placements[target] = Placement(attr_node.target, tuple(old.shape), tuple(offsets),
                                                    (Shard(TP, dim),), replicated_over=DP,
                                                    grad_divisor=self.grad_divisor, copies=self.dp)
                self.placements.pop(attr_node.target, None)
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


def _non_persistent(gm: fx.GraphModule, target: str) -> bool:
    owner, attr = owner_of(gm, target)
    return attr in getattr(owner, "_non_persistent_buffers_set", set())


def _dim(split: fx.Node) -> int:
    d = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    return d % val(split.args[0]).dim()


def _outputs(split: fx.Node) -> list:
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
