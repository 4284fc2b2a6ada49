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

    >>> ffns = find_ffns(capture(model, (input_ids,)))
    >>> [(f.block, f.d, f.f, f.activation) for f in ffns]
    [(0, 32, 128, 'gelu_tanh'), (1, 32, 128, 'gelu_tanh')]
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..errors import AnalysisError

from .linear import (ACTIVATIONS, ELEMENTWISE_OPS, LinearInfo, aten, attr_value, common_module_path, is_side_effect,
                     is_tokenwise, is_view, linear_info, packet, same_size, strip_views, tensor_args, val)


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
    expert needs its own trainable copy, so the experts use the generic path); elementwise: the
    middle treats every element of f on its own (no inner matrices, no reduction or norm over f),
    the condition for splitting f exactly (tensor parallelism, expert slicing).
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

    @property
    def gated(self) -> bool:
        return len(self.ups) > 1

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
        ups, inner, middle, pre, out_chain, x = region
        region_nodes = set(ups) | set(inner) | set(middle) | set(pre) | {down} | set(out_chain)
        if region_nodes & claimed or not _closed(region_nodes, out_chain[-1] if out_chain else down):
            continue
        claimed |= region_nodes
        out = out_chain[-1] if out_chain else down
        info = linears[down]
        found.append(FFN(
            block=len(found), d=info.out_features, f=info.in_features,
            activation=_classify([n for n in middle], len(ups)), input=x.name, output=out.name,
            ups=tuple(u.name for u in sorted(ups, key=order.get)), down=down.name,
            middle=tuple(n.name for n in sorted(middle, key=order.get)),
            inner=tuple(n.name for n in sorted(inner, key=order.get)),
            nodes=tuple(n.name for n in sorted(region_nodes, key=order.get)),
            module_path=".".join(common_module_path([*ups, down])) or None,
            middle_params=_middle_params(gm, middle),
            elementwise=not inner and all(packet(n) in ELEMENTWISE_OPS or is_view(n) for n in middle),
        ))
    return found


def _grow(info: LinearInfo, linears: dict) -> tuple | None:
    """Walk back from a candidate down projection; return (ups, middle, pre_views, out_views, X)."""
    d, f = info.out_features, info.in_features
    ups: list[fx.Node] = []
    inner: list[fx.Node] = []
    middle: list[fx.Node] = []
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
                ups.append(n)  # reads the FFN input X
            else:
                inner.append(n)  # a matrix inside the FFN (e.g. a third linear): generic experts
                stack.append(u.x)
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
    if not inner and any(linears[u].out_features != f for u in ups):
        return None
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
    return ups, inner, middle, pre, out_chain, x


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


