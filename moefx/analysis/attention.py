"""Find attention regions and the tensor axes that carry heads, for tensor-parallel splitting.

An attention region is its *core* — a `scaled_dot_product_attention` node, or the eager form
`softmax(q @ k^T * scale + mask) @ v` (as Hugging Face's `attn_implementation="eager"` and GPT-J
compute it: the core is the final matmul) — the linear projections its q / k / v come from
(separate, or one fused projection split into chunks), the ops in between (views, transposes,
rotary embeddings, interleaved rotary built with `stack`, per-head q / k norms, GQA expands), and
the output projection reached from the core's output through layout ops. For every node of the
region the analysis derives which axes *scale with the number of heads* (the projection width,
the head axis, the width again after the heads are merged): splitting heads over `tp` ranks
divides exactly those sizes by `tp`. When a projection's width is split into (heads, head dim),
the head axis is the output axis whose size is a head count of the core (q heads or key/value
heads), so one key/value head (multi-query attention) is found too.

A static KV cache (what `moefx.gen` graphs hold) is followed through its update: `index_copy`
of the new keys / values into a cache buffer gives the buffer the head axis of the states it
receives. Regions with an op the axis rules do not know (e.g. head counts baked into SymInt
expressions, as in `nn.MultiheadAttention`'s export) are reported with `supported=False` and a
reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .linear import ELEMENTWISE_OPS, aten, linear_info, packet, val

# A KV-cache update: index_copy(cache, dim, positions, new keys or values) writes the new states
# into a cache buffer shaped like them (heads on the same axis); TP shards the buffer with them.
CACHE_UPDATES = {aten.index_copy, aten.index_copy_}
_ELEMENTWISE = ELEMENTWISE_OPS | {aten.contiguous, aten.clone, aten.alias, aten.detach, aten.type_as}
_REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin, aten.var}
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
_NORMS = {aten.layer_norm, aten.rms_norm}
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten}
_MATMULS = {aten.matmul, aten.bmm}
# the ops walked from the core back to the projections
_LAYOUT = (_ELEMENTWISE | _REDUCTIONS | _NORMS | _RESHAPES | CACHE_UPDATES |
           {aten.transpose, aten.permute, aten.expand, aten.unsqueeze, aten.squeeze, aten.select, aten.split,
            aten.split_with_sizes, aten.slice, aten.cat, aten.stack})
SDPA = aten.scaled_dot_product_attention
# between an eager core's two matmuls: scale, mask, softmax, casts, dropout
_SCORE_OPS = {aten.mul, aten.div, aten.add, aten.sub, aten.where, aten.masked_fill, aten.to, aten._to_copy,
              aten.type_as, aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach} | _SOFTMAX


class Unsupported(Exception):
    """The region uses an op whose head axes cannot be derived."""


@dataclass
class Attention:
    """One attention region (node objects of the analysed graph).

    core: the sdpa node, or the eager core's final matmul (probs @ v); kind: "sdpa" / "eager";
    q / k / v: the core's inputs (for the eager core, k is the key before its transpose);
    heads / kv_heads: query and key/value head counts at the core."""

    core: fx.Node
    projections: list[fx.Node]
    out_proj: fx.Node | None
    kind: str = "sdpa"
    q: fx.Node | None = None
    k: fx.Node | None = None
    v: fx.Node | None = None
    heads: int = 0
    kv_heads: int = 0
    flags: dict = field(default_factory=dict)  # node -> tuple of bools (axis scales with heads)
    supported: bool = True
    reason: str = ""


def find_attention(gm: fx.GraphModule) -> list[Attention]:
    """Every attention region (sdpa or eager core) of a captured graph, in graph order."""
    out = []
    for node in gm.graph.nodes:
        qkv = _core_inputs(node)
        if qkv is None:
            continue
        att = _region(node, *qkv)
        if att.supported:
            try:
                att.flags = _propagate(att)
            except Unsupported as e:
                att.supported, att.reason = False, str(e)
        out.append(att)
    return out


def _core_inputs(node: fx.Node) -> tuple | None:
    """(kind, q, k, v) when `node` is an attention core, else None."""
    if packet(node) is SDPA:
        return ("sdpa", *node.args[:3])
    if packet(node) not in _MATMULS or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    n, softmax = node.args[0], None
    for _ in range(12):                         # probs <- dropout / casts <- softmax <- mask / scale <- q @ k^T
        if packet(n) in _SOFTMAX:
            softmax = n
        elif packet(n) in _MATMULS and softmax is not None:
            q, kt = n.args[:2]
            k = kt.args[0] if packet(kt) in (aten.transpose, aten.permute) else None
            if k is None or val(q) is None or val(q).dim() < 3:
                return None
            return "eager", q, k, node.args[1]
        elif packet(n) not in _SCORE_OPS:
            return None
        scores = [a for a in n.all_input_nodes if val(a) is not None and val(n) is not None and
                  val(a).dim() == val(n).dim() and val(a).shape[-1] == val(n).shape[-1]
                  and (packet(a) in _SCORE_OPS or packet(a) in _MATMULS)]
        if not scores:
            return None
        n = scores[0]
    return None


def _region(core: fx.Node, kind: str, q: fx.Node, k: fx.Node, v: fx.Node) -> Attention:
    projections: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [q, k, v]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if linear_info(n) is not None:
            projections.append(n)
            continue
        if packet(n) in _LAYOUT or (n.op == "call_function" and n.target is operator.getitem):
            stack.extend(a for a in n.all_input_nodes if a.op != "get_attr")
    out_proj = _out_projection(core)
    att = Attention(core, sorted(set(projections), key=_order(core.graph)), out_proj, kind, q, k, v)
    att.heads, att.kv_heads = head_count(q), _kv_heads(att)
    if not projections or len(att.projections) > 3:
        att.supported, att.reason = False, f"q/k/v come from {len(att.projections)} projections"
    elif out_proj is None:
        att.supported, att.reason = False, "no output projection after the attention"
    elif att.heads == 0:
        att.supported, att.reason = False, "head count is not static"
    return att


def head_count(x: fx.Node) -> int:
    """The static size of `x`'s head axis (dim -3 of [B, heads, T, hd]), 0 when unknown."""
    v = val(x)
    return int(v.shape[-3]) if v is not None and v.dim() >= 3 and isinstance(v.shape[-3], int) else 0


def _kv_heads(att: Attention) -> int:
    """Key / value heads as projected (before any GQA repeat): the k projection's width over the head
    dim when k has a projection of its own, else the head count at the core."""
    qv = val(att.q)
    head_dim = int(qv.shape[-1]) if qv is not None and isinstance(qv.shape[-1], int) else 0
    own = [p for p in att.projections if reaches(att.k, {p}) and not reaches(att.q, {p})]
    info = linear_info(own[0]) if len(own) == 1 else None
    if info is not None and head_dim and info.out_features % head_dim == 0:
        return info.out_features // head_dim
    return head_count(att.k if att.kind == "sdpa" else att.v)


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.get


def _out_projection(core: fx.Node) -> fx.Node | None:
    n = core
    for _ in range(8):
        if len(n.users) != 1:
            return None
        n = next(iter(n.users))
        if linear_info(n) is not None:
            return n
        if packet(n) not in (aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute,
                             aten.contiguous, aten.clone):
            return None
    return None


def region_nodes(att: Attention) -> list[fx.Node]:
    """Nodes from the projections' outputs to the output projection's input, in graph order."""
    return sorted(att.flags, key=_order(att.core.graph))


# ---------------------------------------------------------------------------------------------
# Axis flags


def _propagate(att: Attention) -> dict:
    graph_order = _order(att.core.graph)
    ancestors = _ancestors(att.core)
    heads = {att.heads, att.kv_heads} - {0}
    flags: dict[fx.Node, tuple[bool, ...]] = {}
    for p in att.projections:
        flags[p] = (False,) * (val(p).dim() - 1) + (True,)
    frontier = sorted({u for p in att.projections for u in p.users if u in ancestors or u is att.core},
                      key=graph_order)
    todo = set(frontier)
    while todo:
        n = min(todo, key=graph_order)
        todo.discard(n)
        if n in flags:
            continue
        if any(a in ancestors and a not in flags and a.op != "get_attr" and reaches(a, set(att.projections))
               for a in n.all_input_nodes):
            # an input still unresolved: come back later
            pending = [a for a in n.all_input_nodes if a in ancestors and a not in flags and
                       reaches(a, set(att.projections))]
            todo.update(pending)
            todo.add(n)
            continue
        flags[n] = _rule(n, flags, heads)
        if n is att.core:
            continue
        todo.update(u for u in n.users if (u in ancestors or u is att.core) and u not in flags)
    if att.core not in flags:
        raise Unsupported(f"{att.core.name}: the projections do not reach the attention")
    # the output side: core -> ... -> out projection input
    n = att.core
    while True:
        user = next(iter(n.users))
        if user is att.out_proj:
            break
        flags[user] = _rule(user, flags, heads)
        n = user
    return flags


def reaches(node: fx.Node, targets: set[fx.Node]) -> bool:
    """Whether any of `targets` is `node` or one of its ancestors."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _in_flags(a, flags, ndim: int) -> tuple[bool, ...]:
    if not isinstance(a, fx.Node) or a not in flags:
        return (False,) * ndim
    return flags[a]


def _dims(n: fx.Node, nd: int) -> list[int]:
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if d is None:
        return list(range(nd))
    return [x % nd for x in ([d] if isinstance(d, int) else d)]


def _rule(n: fx.Node, flags: dict, heads: set = frozenset()) -> tuple[bool, ...]:
    p = packet(n)
    out = val(n)
    if n.op == "call_function" and n.target is operator.getitem:
        return flags[n.args[0]]
    if p in (aten.split, aten.split_with_sizes):
        return flags[n.args[0]]
    if out is None:
        raise Unsupported(f"{n.name} ({n.target}) has no tensor metadata")
    nd = out.dim()
    x = n.args[0] if n.args else None
    fx_ = _in_flags(x, flags, val(x).dim() if isinstance(x, fx.Node) and val(x) is not None else 0)
    if p in _MATMULS:
        a = _in_flags(n.args[0], flags, val(n.args[0]).dim())
        b = _in_flags(n.args[1], flags, val(n.args[1]).dim())
        if (a and a[-1]) or (len(b) > 1 and b[-2]):
            raise Unsupported(f"{n.name} contracts a head axis")
        res = [False] * nd
        for f in (a[:-2], b[:-2]):
            for i in range(1, len(f) + 1):
                res[nd - 2 - i] = res[nd - 2 - i] or f[len(f) - i]
        res[-2], res[-1] = a[-2] if len(a) > 1 else False, b[-1]
        return tuple(res)
    if p in _SOFTMAX or p in _REDUCTIONS or p in _NORMS:
        src = val(x)
        if p in _NORMS:
            shape = n.args[1]
            dims = list(range(src.dim() - len(shape), src.dim()))
        else:
            dims = _dims(n, src.dim())
        if any(fx_[d] for d in dims):
            raise Unsupported(f"{n.name} reduces over a head axis")
        keep = p in _SOFTMAX or p in _NORMS or (n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        return fx_ if keep else tuple(f for i, f in enumerate(fx_) if i not in dims)
    if p is aten.stack:
        d = (n.args[1] if len(n.args) > 1 else 0) % nd
        res = [False] * (nd - 1)
        for t in n.args[0]:
            for i, f in enumerate(_in_flags(t, flags, nd - 1)):
                res[i] = res[i] or f
        res.insert(d, False)
        return tuple(res)
    if p in _ELEMENTWISE or p is SDPA:
        if p is SDPA:
            return flags[n.args[0]]
        res = [False] * nd
        for a in n.all_input_nodes:
            if a in flags:
                f = flags[a]
                for i in range(1, len(f) + 1):
                    res[nd - i] = res[nd - i] or f[len(f) - i]
        return tuple(res)
    if p is aten.transpose:
        a, b = (d % len(fx_) for d in n.args[1:3])
        f = list(fx_)
        f[a], f[b] = f[b], f[a]
        return tuple(f)
    if p is aten.permute:
        return tuple(fx_[d % len(fx_)] for d in n.args[1])
    if p is aten.unsqueeze:
        d = n.args[1] % nd
        f = list(fx_)
        f.insert(d, False)
        return tuple(f)
    if p is aten.squeeze:
        dims = n.args[1] if len(n.args) > 1 else [i for i, s in enumerate(val(x).shape) if s == 1]
        dims = [dims] if isinstance(dims, int) else dims
        dims = {d % len(fx_) for d in dims if val(x).shape[d] == 1}
        return tuple(f for i, f in enumerate(fx_) if i not in dims)
    if p is aten.expand:
        pad = nd - len(fx_)
        return (False,) * pad + tuple(fx_)
    if p in CACHE_UPDATES:
        src = n.args[3]
        res = _in_flags(src, flags, nd)
        if res[n.args[1] % nd]:
            raise Unsupported(f"{n.name} writes the cache along a head axis")
        return res
    if p is aten.slice:
        d = n.args[1] % len(fx_)
        if fx_[d] and not _full_slice(n):
            raise Unsupported(f"{n.name} slices a head axis")
        return fx_
    if p is aten.select:
        d = n.args[1] % len(fx_)
        if fx_[d]:
            raise Unsupported(f"{n.name} selects along a head axis")
        return tuple(f for i, f in enumerate(fx_) if i != d)
    if p is aten.cat:
        tensors = n.args[0]
        d = (n.args[1] if len(n.args) > 1 else 0) % nd
        res = [False] * nd
        for t in tensors:
            for i, f in enumerate(_in_flags(t, flags, nd)):
                res[i] = res[i] or f
        if res[d]:
            raise Unsupported(f"{n.name} concatenates along a head axis")
        return tuple(res)
    if p in _RESHAPES:
        return _reshape_flags(n, fx_, heads)
    raise Unsupported(f"no head-axis rule for {n.name} ({n.target})")


def _full_slice(n: fx.Node) -> bool:
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else None
    return (start in (0, None)) and (end is None or (isinstance(end, int) and end >= 2**62))


def _hint(s) -> int:
    """A size's value in the example the graph was captured with."""
    if isinstance(s, int):
        return s
    node = s.node
    if node.hint is not None:
        return int(node.hint)
    return int(node.shape_env.size_hint(node.expr))


def _reshape_flags(n: fx.Node, in_flags: tuple[bool, ...], heads: set = frozenset()) -> tuple[bool, ...]:
    """Group input and output axes with equal products (by the captured example's sizes); a group
    holding a head axis on the input side flags the output axis of the group whose size is a head
    count (the first such), else the first that is not 1."""
    src = [_hint(s) for s in val(n.args[0]).shape]
    dst = [_hint(s) for s in val(n).shape]
    out = [False] * len(dst)
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        while pi != pj:
            if pi < pj and i + 1 < len(src):
                i += 1
                gi.append(i)
                pi *= src[i]
            elif pj < pi and j + 1 < len(dst):
                j += 1
                gj.append(j)
                pj *= dst[j]
            else:
                raise Unsupported(f"{n.name}: cannot group the reshape's axes")
        if sum(in_flags[k] for k in gi) > 1:
            raise Unsupported(f"{n.name}: merges two head axes")
        if any(in_flags[k] for k in gi):
            head = next((k for k in gj if dst[k] in heads), None) if len(gj) > 1 else None
            out[head if head is not None else next((k for k in gj if dst[k] != 1), gj[0])] = True
        i, j = i + 1, j + 1
    if any(in_flags[k] for k in range(i, len(src))):
        raise Unsupported(f"{n.name}: cannot map head axes through the reshape")
    return tuple(out)
