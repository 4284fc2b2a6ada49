"""Find the Transformer blocks of a captured graph from the dataflow.

A Transformer is one or more *stacks*: chains of blocks along a residual stream. A block reads
the stream (its *input*), adds each sublayer to it with a *residual add* (attention, T5's
cross-attention, the FFN) and hands it on (its *output*). The block ends with the residual add
after its FFN (pre-LN: GPT-2, LLaMA, T5, ViT), or with the LayerNorm applied to that add when the
stream between sublayers is normalised (post-LN: BERT, nn.TransformerEncoder with norm_first=False).

How the analysis sees it, with no module names involved:

- a *residual add* is `aten.add(a, b)` where one argument (the *stream*) is an ancestor of the
  other, the path between them goes through a weight (a linear / a call_module), and the result
  has the stream's shape. `x + tanh(x)` inside GELU has no weight on the path and is not one;
- residual adds are linked along the stream: the stream argument of the next add is the
  previous add itself (pre-LN) or a normalisation of it (post-LN), seen through ops that do not
  change the value (dropout in eval, same-dtype casts, same-shape views, clones);
- a chain of linked adds is a stack; it is cut into blocks after every add whose sublayer
  contains an FFN: a region of `find_ffns` or, in a converted graph, nodes the PR-MoE pass tagged
  (`moefx_layer` on the MoE nodes, role "ffn" / "residual" on the dense MLP nodes), so a
  non-residual MoE layer whose dense FFN is gone still counts.

Blocks are numbered in graph order of their FFN, the numbering `find_ffns` and `pr_moe` use (T5:
encoder blocks first). A graph made by the shrink pass records which blocks of its teacher it
kept (`facts(gm).block_origin`); `Block.origin` reports that, `Block.index` the position.

    >>> blocks = find_blocks(capture(model, (input_ids,)))      # GPT-2, 4 blocks
    >>> [(b.index, b.stack, b.input, b.output) for b in blocks][:2]
    [(0, 0, 'add_1', 'add_7'), (1, 0, 'add_7', 'add_11')]

Does not handle: parallel blocks (GPT-J / NeoX: `x + attn(ln(x)) + mlp(ln(x))`, the FFN add's
stream is not the attention add), residual streams scaled before the add (DeepNet's `a * x + f(x)`),
or stacks joined by something else than the residual stream (the analysis reports them as
separate stacks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from .. import meta as M
from ..errors import AnalysisError
from ..facts import facts
from .ffn import FFN, find_ffns
from .linear import aten, common_module_path, is_side_effect, linear_info, packet, same_size, val

_NORM_OPS = {aten.layer_norm, aten.rms_norm}
# Ops a decomposed RMSNorm / LayerNorm is made of (T5LayerNorm, LlamaRMSNorm).
_NORM_PIECES = {aten.pow, aten.square, aten.mul, aten.mean, aten.var, aten.add, aten.sub, aten.div, aten.rsqrt,
                aten.sqrt, aten.reciprocal, aten.to, aten._to_copy, aten.type_as, aten.alias, aten.clone,
                aten.contiguous}
_REDUCTIONS = {aten.mean, aten.var}
_SAME_VALUE = {aten.alias, aten.clone, aten.contiguous}
_CASTS = {aten.to, aten._to_copy, aten.type_as}
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.expand}


@dataclass(frozen=True)
class Block:
    """One Transformer block, by node names (stable across graph copies).

    index: position in graph order (0-based, over all stacks); stack: which chain of blocks it is
    in (0 = first in graph order; T5: 0 encoder, 1 decoder); position: index inside its stack;
    origin: the teacher's block index (== index unless the graph is a shrunk student);
    input: the stream value the block reads; output: the stream value it hands on (the FFN's
    residual add, or the LayerNorm after it when post_norm); residual_adds: one per sublayer, in
    order (the last one adds the FFN); ffn_output: the node carrying the FFN (or MoE) result into
    that add; ffn: the dense FFN region when there is one (a PR-MoE layer's residual MLP too),
    with `ffn.block` set to this block's index;
    moe_layer / num_experts: the MoE layer index (submodule `moe{L}`) and its expert count, None
    for a dense block; nodes: the block's computation (nodes that depend on `input` and feed
    `output`, graph order); module_path: common module path of those nodes, e.g. "transformer.h.0".
    """

    index: int
    stack: int
    position: int
    origin: int
    input: str
    output: str
    residual_adds: tuple[str, ...]
    ffn_output: str
    ffn: FFN | None
    moe_layer: int | None
    num_experts: int | None
    post_norm: bool
    nodes: tuple[str, ...]
    module_path: str | None

    @property
    def is_moe(self) -> bool:
        return self.moe_layer is not None


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """All Transformer blocks of a captured (dense) or converted (PR-MoE) graph, in graph order.

    Takes a GraphModule from `moefx.capture` / `moefx.convert`. Returns a list of Block (empty
    when no residual stream with an FFN is found). Raises AnalysisError when the graph has no
    shape metadata, or when the residual stream branches (two adds continue the same stream).
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    ffns = find_ffns(gm)
    ffn_by_output = {by_name[f.output]: f for f in ffns}
    residuals = [r for n in nodes if (r := _residual(n, order)) is not None]
    if not residuals:
        return []
    by_add = {r.add: r for r in residuals}

    # Link every residual add to the one before it on the stream.
    succ: dict[fx.Node, _Residual] = {}
    for r in residuals:
        s = strip(r.stream)
        if s in by_add:
            r.prev = s
        else:
            prev = _normalised_add(s, by_add)
            if prev is not None:
                r.prev, r.norm = prev, s
        if r.prev is not None:
            if r.prev in succ:
                raise AnalysisError(
                    f"the residual stream branches after {r.prev.name}: both {succ[r.prev].add.name} and "
                    f"{r.add.name} add a sublayer to it (a parallel attention + MLP block?); moefx finds "
                    "blocks of sequential residual Transformers only")
            succ[r.prev] = r

    # Walk each chain, cutting it after every add whose sublayer holds an FFN.
    raw: list[tuple[int, list[_Residual]]] = []  # (stack, adds)
    stack_id = 0
    for head in residuals:
        if head.prev is not None:
            continue
        chain = [head]
        while chain[-1].add in succ:
            chain.append(succ[chain[-1].add])
        current: list[_Residual] = []
        found = False
        for r in chain:
            current.append(r)
            if _holds_ffn(r, ffn_by_output):
                raw.append((stack_id, current))
                current, found = [], True
        stack_id += found

    raw.sort(key=lambda item: order[item[1][-1].add])
    stacks_in_order: dict[int, int] = {}
    for sid, _ in raw:
        stacks_in_order.setdefault(sid, len(stacks_in_order))
    origin = facts(gm).block_origin
    if origin is not None and len(origin) != len(raw):
        origin = None

    out: list[Block] = []
    positions: dict[int, int] = {}
    for index, (sid, adds) in enumerate(raw):
        stack = stacks_in_order[sid]
        position = positions.get(stack, 0)
        positions[stack] = position + 1
        last = adds[-1]
        following = succ.get(last.add)
        post_norm = any(r.norm is not None for r in adds[1:]) or (following is not None and following.norm is not None)
        output = last.add
        if post_norm:
            if following is not None and following.norm is not None:
                output = following.norm
            else:
                output = _norm_after(last.add) or last.add
        inp = strip(adds[0].stream)
        region = _between(inp, output, order) or set()
        n = adds[0].stream
        while n is not inp:  # the identity ops between the stream and this block's first add are not its own
            region.discard(n)
            n = n.args[0]
        ffn = next((ffn_by_output[n] for n in last.region if n in ffn_by_output), None)
        if ffn is not None and ffn.block != index:  # find_ffns numbers FFNs, not blocks (MoE layers lost theirs)
            ffn = dataclasses.replace(ffn, block=index)
        layer = next((n.meta[M.LAYER] for n in last.region if n.meta.get(M.LAYER) is not None), None)
        if layer is not None:
            layer_nodes = [n for n in last.region if n.meta.get(M.LAYER) == layer]
            ffn_out = max(layer_nodes, key=order.get)
        elif ffn is not None:
            ffn_out = by_name[ffn.output]
        else:  # tagged dense FFN nodes without a find_ffns region
            ffn_out = max((n for n in last.region if n.meta.get(M.ROLE) in ("ffn", "residual")), key=order.get)
        out.append(Block(
            index=index, stack=stack, position=position,
            origin=int(origin[index]) if origin is not None else index,
            input=inp.name, output=output.name, residual_adds=tuple(r.add.name for r in adds),
            ffn_output=ffn_out.name, ffn=ffn, moe_layer=layer, num_experts=_num_experts(gm, layer),
            post_norm=post_norm, nodes=tuple(n.name for n in sorted(region, key=order.get)),
            module_path=_module_path(region),
        ))
    return out


def stacks(blocks: list[Block]) -> list[list[Block]]:
    """Blocks grouped by stack (in stack order), each list in chain order."""
    out: dict[int, list[Block]] = {}
    for b in blocks:
        out.setdefault(b.stack, []).append(b)
    return [sorted(v, key=lambda b: b.position) for _, v in sorted(out.items())]


# --------------------------------------------------------------------------------------------
# Residual adds
# --------------------------------------------------------------------------------------------


class _Residual:
    """A residual add: add = stream + sublayer(stream); region = the sublayer's nodes."""

    __slots__ = ("add", "stream", "region", "prev", "norm")

    def __init__(self, add: fx.Node, stream: fx.Node, region: set):
        self.add, self.stream, self.region = add, stream, region
        self.prev: fx.Node | None = None  # the residual add before this one on the stream
        self.norm: fx.Node | None = None  # the norm between prev and this add (post-LN)


def _residual(node: fx.Node, order: dict) -> _Residual | None:
    if packet(node) is not aten.add or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or "get_attr" in (a.op, b.op):
        return None
    out = val(node)
    if out is None or out.dim() < 2:
        return None
    for stream, other in ((a, b), (b, a)):
        sv = val(stream)
        if sv is None or order[stream] >= order[other] or not _same_shape(sv, out):
            continue
        region = _between(stream, other, order)
        if region and any(_weighted(n) for n in region):
            return _Residual(node, stream, region)
    return None


def _between(src: fx.Node, dst: fx.Node, order: dict) -> set | None:
    """Nodes that depend on `src` and feed `dst` (dst included, src not); None if src does not feed dst."""
    lo = order[src]
    seen: set[fx.Node] = set()
    stack = [dst]
    reached = False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a is src:
                reached = True
            elif order[a] > lo and a not in seen:
                stack.append(a)
    if not reached:
        return None
    region = {src}
    for n in sorted(seen, key=order.get):
        if any(a in region for a in n.all_input_nodes):
            region.add(n)
    region.discard(src)
    return region


def _weighted(node: fx.Node) -> bool:
    """A node that applies learned weights: a linear, a call_module, or an op reading a >= 2-D parameter."""
    if node.op == "call_module":
        return True
    if node.op != "call_function" or is_side_effect(node):
        return False
    if linear_info(node) is not None:
        return True
    return any(a.op == "get_attr" and (v := val(a)) is not None and v.dim() >= 2 for a in node.all_input_nodes)


def _holds_ffn(r: _Residual, ffn_by_output: dict) -> bool:
    for n in r.region:
        if n in ffn_by_output or n.meta.get(M.LAYER) is not None or n.meta.get(M.ROLE) in ("ffn", "residual"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Value-preserving ops and normalisations
# --------------------------------------------------------------------------------------------


def strip(node: fx.Node) -> fx.Node:
    """Follow ops that return their input's value unchanged (eval dropout, same-dtype casts,
    same-shape views, clones) back to the node that produced the value."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args \
            and isinstance(node.args[0], fx.Node) and _identity(node):
        node = node.args[0]
    return node


def _identity(node: fx.Node) -> bool:
    p = packet(node)
    if p in _SAME_VALUE:
        return True
    if p is aten.dropout:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        prob = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        return train is False or prob == 0
    v, src = val(node), val(node.args[0])
    if v is None or src is None:
        return False
    if p in _CASTS:
        return v.dtype == src.dtype and v.device == src.device and _same_shape(v, src)
    if p in _RESHAPES:
        return _same_shape(v, src)
    return False


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def is_norm_of(node: fx.Node, x: fx.Node, limit: int = 32) -> bool:
    """Whether `node` normalises `x` over the last dimension: aten.layer_norm / rms_norm, or a
    decomposed RMSNorm / LayerNorm (casts, pow, mean, rsqrt, mul by a 1-D weight)."""
    if packet(node) in _NORM_OPS:
        return strip(node.args[0]) is strip(x)
    if packet(node) not in _NORM_PIECES:
        return False
    seen: set[fx.Node] = set()
    stack, reduced, reached = [node], False, False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is x:
            reached = True
            continue
        if n.op == "get_attr":
            v = val(n)
            if v is not None and v.dim() > 1:
                return False
            continue
        if n.op != "call_function" or packet(n) not in _NORM_PIECES or len(seen) > limit:
            return False
        reduced = reduced or packet(n) in _REDUCTIONS
        stack.extend(n.all_input_nodes)
    return reached and reduced


def _normalised_add(s: fx.Node, by_add: dict) -> fx.Node | None:
    """The residual add that `s` is a normalisation of, if any (post-LN link)."""
    if packet(s) in _NORM_OPS:
        x = strip(s.args[0])
        return x if x in by_add else None
    if packet(s) not in _NORM_PIECES:
        return None
    seen: set[fx.Node] = set()
    stack = [s]
    while stack and len(seen) < 32:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in by_add and n is not s:
            return n if is_norm_of(s, n) else None
        if n.op == "call_function" and packet(n) in _NORM_PIECES:
            stack.extend(n.all_input_nodes)
    return None


def _norm_after(x: fx.Node, limit: int = 32) -> fx.Node | None:
    """The normalisation applied to `x` (searched forward through norm pieces), if any."""
    seen: set[fx.Node] = set()
    stack = list(x.users)
    best: fx.Node | None = None
    order = {n: i for i, n in enumerate(x.graph.nodes)} if x.graph is not None else {}
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if packet(n) in _NORM_OPS and strip(n.args[0]) is x:
            return n
        if packet(n) in _NORM_PIECES and not _identity(n):
            if is_norm_of(n, x) and (best is None or order[n] > order[best]):
                best = n
            stack.extend(n.users)
        elif n.op == "call_function" and _identity(n):
            stack.extend(n.users)
    return best


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _num_experts(gm: fx.GraphModule, layer: int | None) -> int | None:
    if layer is None:
        return None
    try:
        mod = gm.get_submodule(f"moe{layer}")
    except AttributeError:
        return None
    n = getattr(mod, "num_experts", None)
    return int(n) if n is not None else None


def _module_path(region) -> str | None:
    common = common_module_path(region)
    digits = [i for i, part in enumerate(common) if part.isdigit()]
    if digits:  # "encoder.block.1.layer" (T5's sublayers sit in a ModuleList) -> "encoder.block.1"
        common = common[:digits[-1] + 1]
    return ".".join(common) or None
