"""Find position-wise FFN regions from the dataflow.

An FFN is a region that expands the hidden size d to an inner size f with one or more *up*
linears reading the same input X, applies only token-wise ops (activation, gating multiply for
SwiGLU/GeGLU, dropout, casts, bias adds), and contracts back to d with one *down* linear.
Attention never matches: its output projection is reached through a matmul of two activations.

The search starts from every linear (candidate down projection) and walks its input backwards
through token-wise ops until it reaches linears d -> f (the ups). Linears met on the way whose
input is not d wide are *inner* matrices (an MLP with three or more layers): such an FFN is still
found, and its experts run on the generic path (`moefx.nn.experts.GenericExperts`). Module names are only used to
label a region when `nn_module_stack` metadata is present.

A *fused* up projection is one linear d -> k f whose output is cut on its last dimension
(`chunk` / `split` + getitem, `h[..., :f]`, `narrow`) into the f-wide pieces the middle reads,
e.g. Phi-3's `gate, up = gate_up_proj(x).chunk(2, -1)`. Each piece is a *part*: (the node
the middle reads, the up linear, columns [lo, hi) of its output); a plain up is one part
(up, up, 0, f). Stacked experts keep one up matrix per part, so a fused FFN's experts compute
exactly what the dense one does and can still be sliced over f; the dense FFN itself is not
`elementwise` (splitting the fused matrix's columns evenly would mix its parts).

    >>> ffns = find_ffns(capture(model, (input_ids,)))
    >>> [(f.block, f.d, f.f, f.activation) for f in ffns]
    [(0, 32, 128, 'gelu_tanh'), (1, 32, 128, 'gelu_tanh')]
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..errors import AnalysisError
from .linear import (
    ACTIVATIONS,
    ELEMENTWISE_OPS,
    LinearInfo,
    aten,
    attr_value,
    common_module_path,
    is_last_dim_split,
    is_side_effect,
    is_tokenwise,
    is_view,
    last_dim_part,
    linear_info,
    packet,
    same_size,
    strip_views,
    tensor_args,
    val,
)


@dataclass(frozen=True)
class FFN:
    """One FFN region, by node names (stable across graph copies).

    block: index of the Transformer block (FFNs in graph order); d / f: hidden / inner size;
    activation: "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "reglu", "gated" or "custom";
    input: X, the node the ups read; output: the node carrying the FFN result ([..., d]);
    ups / down: linear nodes; middle: token-wise nodes between them; inner: further linears inside
    the region (FFNs with more than two matrices: their MoE experts use the generic path); nodes: the whole region
    (every node that only the FFN uses, in graph order); module_path: e.g. "transformer.h.0.mlp";
    middle_params: parameters the middle reads (e.g. a LayerNorm over f, as NormFormer has: every
    expert needs its own trainable copy, so the experts use the generic path);
    parts: the f-wide inputs of the middle, (node it reads, up linear, lo, hi): columns [lo, hi) of
    that up's output (see the module docstring; a plain up is (up, up, 0, f)); splits: the nodes
    that cut fused ups into parts (views, split / chunk, getitem, slice), part of the region;
    middle_elementwise: the middle treats every element of f on its own (no inner matrices, no
    reduction or norm over f, no f-sized tensors read), so stacked experts, whose fused ups are kept
    as one matrix per part, can be sliced over f exactly (expert slicing);
    elementwise: the same and no fused up: the condition for splitting the dense FFN's matrices over
    f exactly (tensor parallelism takes contiguous columns of each up and rows of the down).
    """

    block: int
    d: int
    f: int
    activation: str
    input: str
    output: str
    ups: tuple[str, ...]
    down: str
    middle: tuple[str, ...]
    nodes: tuple[str, ...]
    module_path: str | None
    inner: tuple[str, ...] = ()
    middle_params: tuple[str, ...] = ()
    elementwise: bool = True
    parts: tuple[tuple[str, str, int, int], ...] = ()
    splits: tuple[str, ...] = ()
    middle_elementwise: bool = True

    @property
    def gated(self) -> bool:
        return len(self.parts or self.ups) > 1

    @property
    def fused(self) -> bool:
        """Whether an up projection is fused (its output is cut into several parts)."""
        return any(node != up for node, up, _, _ in self.parts)

    @property
    def stackable(self) -> bool:
        """Whether the experts can run as stacked up/down matrices (no inner matrices, no parameters
        in the middle)."""
        return not self.inner and not self.middle_params


def find_ffns(gm: fx.GraphModule) -> list[FFN]:
    """All FFN regions of a captured graph, in block order.

    Takes a GraphModule from `moefx.capture` (nodes carry meta["val"]). Returns a list of FFN.
    Raises AnalysisError when the graph has no shape metadata.
    """
    nodes = list(gm.graph.nodes)
    if not any("val" in n.meta for n in nodes if n.op == "call_function"):
        raise AnalysisError("the graph has no shape metadata (meta['val']): capture it with moefx.capture "
                            "or torch.export first")
    order = {n: i for i, n in enumerate(nodes)}
    linears = {n: info for n in nodes if (info := linear_info(n)) is not None}
    found: list[FFN] = []
    claimed: set[fx.Node] = set()
    for down in nodes:
        if down not in linears or down in claimed:
            continue
        region = _grow(linears[down], linears)
        if region is None:
            continue
        ups, inner, middle, pre, out_chain, x, parts, splits = region
        region_nodes = set(ups) | set(inner) | set(middle) | set(pre) | set(splits) | {down} | set(out_chain)
        if region_nodes & claimed or not _closed(region_nodes, out_chain[-1] if out_chain else down):
            continue
        claimed |= region_nodes
        out = out_chain[-1] if out_chain else down
        info = linears[down]
        parts = sorted(parts, key=lambda p: order[p[0]])
        fused = any(node is not up for node, up, _, _ in parts)
        middle_elementwise = not inner and _elementwise(middle)
        found.append(FFN(
            block=len(found), d=info.out_features, f=info.in_features,
            activation=_classify([n for n in middle], len(parts)), input=x.name, output=out.name,
            ups=tuple(u.name for u in sorted(ups, key=order.get)), down=down.name,
            middle=tuple(n.name for n in sorted(middle, key=order.get)),
            inner=tuple(n.name for n in sorted(inner, key=order.get)),
            nodes=tuple(n.name for n in sorted(region_nodes, key=order.get)),
            module_path=".".join(common_module_path([*ups, down])) or None,
            middle_params=_middle_params(gm, middle),
            elementwise=middle_elementwise and not fused,
            parts=tuple((node.name, up.name, lo, hi) for node, up, lo, hi in parts),
            splits=tuple(n.name for n in sorted(splits, key=order.get)),
            middle_elementwise=middle_elementwise,
        ))
    return found


def _elementwise(middle: list[fx.Node]) -> bool:
    """Every middle op treats each element of f on its own and reads no tensor constant or parameter
    with more than one element (a bias or scale over f would have to be split with f)."""
    for n in middle:
        if not (packet(n) in ELEMENTWISE_OPS or is_view(n)):
            return False
        for a in n.all_input_nodes:
            if a.op == "get_attr" and (v := val(a)) is not None and v.numel() > 1:
                return False
    return True


def _grow(info: LinearInfo, linears: dict) -> tuple | None:
    """Walk back from a candidate down projection; return (ups, inner, middle, pre_views, out_views, X,
    parts, splits) or None."""
    d, f = info.out_features, info.in_features
    ups: list[fx.Node] = []
    inner: list[fx.Node] = []
    middle: list[fx.Node] = []
    parts: list[tuple[fx.Node, fx.Node, int, int]] = []
    splits: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [info.x]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linears:
            u = linears[n]
            if u.in_features == d:
                if n not in ups:
                    ups.append(n)  # reads the FFN input X
                parts.append((n, n, 0, u.out_features))
            else:
                inner.append(n)  # a matrix inside the FFN (e.g. a third linear): generic experts
                stack.append(u.x)
            continue
        piece = last_dim_part(n)
        if piece is not None:
            split, src, lo, hi = piece
            chain = []
            while src not in linears and isinstance(src, fx.Node) and is_view(src) and len(src.users) == 1:
                chain.append(src)
                src = src.args[0]
            if src in linears and linears[src].in_features == d:
                parts.append((n, src, lo, hi))  # a part of a fused up projection
                splits.update([n, *chain] + ([split] if split is not None else []))
                if src not in ups:
                    ups.append(src)
                continue
            middle.append(n)  # a cut of a middle value: token-wise, not elementwise over f
            stack.append(split if split is not None else n.args[0])
            continue
        if is_last_dim_split(n):
            middle.append(n)
            stack.append(n.args[0])
            continue
        if n.op != "call_function" or not is_tokenwise(n) or val(n) is None:
            return None
        middle.append(n)
        for a in tensor_args(n):
            if a.op == "get_attr":
                v = val(a)
                if v is not None and v.dim() > 1:
                    return None  # a matrix parameter inside the region: not a plain FFN
                continue
            stack.append(a)
        if len(middle) > 64:
            return None
    if not ups or not any(not is_view(m) for m in middle):
        return None
    if not inner:
        for node, up, lo, hi in parts:
            width, out_f = hi - lo, linears[up].out_features
            if width != f or out_f % width or lo % width:
                return None  # every part one aligned f-wide piece of its up
    if splits & set(middle):
        return None  # a fused up's part also read as a middle value
    xs = {strip_views(linears[u].x) for u in ups}
    if len(xs) != 1:
        return None
    x = xs.pop()
    pre: list[fx.Node] = []
    for u in ups:
        n = linears[u].x
        while n is not x:
            pre.append(n)
            n = n.args[0]
    out_chain: list[fx.Node] = []
    out = info.node
    while len(out.users) == 1 and is_view(next(iter(out.users))):
        out = next(iter(out.users))
        out_chain.append(out)
    xv, ov = val(x), val(out)
    if xv is None or ov is None or not same_size(xv.shape[-1], ov.shape[-1]):
        return None
    return ups, inner, middle, pre, out_chain, x, parts, splits


def _middle_params(gm: fx.GraphModule, middle: list[fx.Node]) -> tuple[str, ...]:
    """get_attr targets the middle reads that are parameters (trainable state inside the FFN)."""
    targets = {a.target for n in middle for a in n.all_input_nodes if a.op == "get_attr"}
    return tuple(sorted(t for t in targets if isinstance(attr_value(gm, t), nn.Parameter)))


def _closed(region: set, out: fx.Node) -> bool:
    """No value computed inside the region escapes it except through `out`."""
    for n in region:
        if n is out:
            continue
        for user in n.users:
            if user not in region and not is_side_effect(user):
                return False
    return True


def _classify(middle: list[fx.Node], num_ups: int) -> str:
    ops = {packet(n) for n in middle}
    acts = [ACTIVATIONS[p] for p in ops if p in ACTIVATIONS]
    gelu_tanh = any(packet(n) is aten.gelu and n.kwargs.get("approximate") == "tanh" for n in middle) or \
        (aten.tanh in ops and aten.pow in ops)
    if num_ups > 1:
        if "silu" in acts:
            return "swiglu"
        if "gelu" in acts or gelu_tanh:
            return "geglu"
        if "relu" in acts:
            return "reglu"
        return "gated"
    if gelu_tanh:
        return "gelu_tanh"
    if len(acts) == 1:
        return acts[0]
    return "custom"


