"""Recognise linear layers and token-wise ops in an ATen graph.

A *linear-like* node multiplies an activation by a parameter matrix on its last dimension:
`aten.linear(x, W[out, in], b)`, `aten.addmm(b, x, W[in, out])` (GPT-2's Conv1D),
`aten.addmm(b, x, W.t())`, `aten.mm` / `aten.matmul` with a parameter, and `aten.einsum` (which
torch.export keeps as one node) whose equation contracts the activation's last dimension with
one dimension of a 2-D parameter and keeps every other dimension in order:
`einsum("btd,df->btf", x, W[in, out])`, `einsum("...d,fd->...f", x, W[out, in])`, operands in
either order. A *token-wise* op treats every token (row of the last dimension) independently and
does not care how many leading dimensions there are: elementwise math, activations, dropout,
dtype casts, views that keep the last dimension, and normalisations over the last dimension.
A *last-dim part* takes a contiguous range of the last dimension (`chunk` / `split` + getitem,
`x[..., a:b]`, `narrow`): how a fused projection (gate and up in one matrix) is cut.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

# Ops that only reshape leading dimensions or are no-ops on values.
VIEW_OPS = {aten.view, aten.reshape, aten._unsafe_view, aten.contiguous, aten.alias, aten.clone,
            aten.detach, aten.flatten}

ELEMENTWISE_OPS = {
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.square, aten.abs, aten.reciprocal,
    aten.tanh, aten.sigmoid, aten.gelu, aten.silu, aten.relu, aten.relu6, aten.erf, aten.exp, aten.log,
    aten.sqrt, aten.rsqrt, aten.clamp, aten.clamp_min, aten.clamp_max, aten.hardtanh, aten.leaky_relu,
    aten.softplus, aten.mish, aten.elu, aten.selu, aten.celu, aten.hardswish, aten.hardsigmoid,
    aten.where, aten.maximum, aten.minimum, aten.dropout, aten.native_dropout, aten.to, aten._to_copy,
    aten.type_as, aten.sin, aten.cos, aten.log1p, aten.expm1, aten.gelu_backward,
}
LAST_DIM_OPS = {aten.layer_norm, aten.rms_norm, aten.mean, aten.sum, aten.amax, aten.softmax,
                aten._softmax, aten.log_softmax}

ACTIVATIONS = {aten.gelu: "gelu", aten.silu: "silu", aten.relu: "relu", aten.tanh: "tanh",
               aten.sigmoid: "sigmoid", aten.relu6: "relu6", aten.mish: "mish", aten.elu: "elu",
               aten.leaky_relu: "leaky_relu", aten.hardswish: "hardswish", aten.softplus: "softplus"}

# Ops that cut a tensor into pieces along a dimension (their outputs are taken with getitem).
SPLIT_OPS = {aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.unsafe_split_with_sizes,
             aten.unsafe_chunk}

SIDE_EFFECT_OPS = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size}


def packet(node: fx.Node):
    """The op overload packet of a call_function node (aten.linear for aten.linear.default), or None."""
    if node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", None)


def val(node) -> torch.Tensor | None:
    """The fake tensor a node produces, if it is a tensor."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_side_effect(node: fx.Node) -> bool:
    """Assertion nodes export leaves in the graph; they check values but compute nothing."""
    return packet(node) in SIDE_EFFECT_OPS


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are tensors (SymInt shape arguments are skipped)."""
    out = []
    for a in node.all_input_nodes:
        if a.op == "get_attr" or val(a) is not None:
            out.append(a)
    return out


@dataclass(frozen=True)
class LinearInfo:
    """A linear-like node: y = x @ M + b with M = W.T when `transposed` (W stored [out, in])."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    transposed: bool
    bias: fx.Node | None
    in_features: int
    out_features: int


def _param_source(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """Follow t()/transpose/permute/casts from a weight operand to its get_attr; (node, flipped)."""
    flipped = False
    while node.op == "call_function":
        p = packet(node)
        if p in (aten.t, aten.transpose, aten.permute, aten.numpy_T):
            flipped = not flipped
        elif p not in (aten.to, aten._to_copy, aten.alias, aten.detach, aten.contiguous):
            return None
        node = node.args[0]
    if node.op != "get_attr":
        return None
    return node, flipped


def linear_info(node: fx.Node) -> LinearInfo | None:
    """Describe `node` as a linear layer, or None when it is not one."""
    p = packet(node)
    if p is aten.linear:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        transposed_default = True
    elif p is aten.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b, x, w = node.args[:3]
        transposed_default = False
    elif p in (aten.mm, aten.matmul):
        x, w = node.args[:2]
        b = None
        transposed_default = False
    elif p is aten.einsum:
        form = _einsum_linear(node)
        if form is None:
            return None
        x, w, transposed_default, _ = form
        b = None
    else:
        return None
    if not isinstance(w, fx.Node) or not isinstance(x, fx.Node) or val(x) is None:
        return None
    src = _param_source(w)
    if src is None:
        return None
    wnode, flipped = src
    wval = val(wnode) if "val" in wnode.meta else None
    shape = tuple(wval.shape) if wval is not None else None
    if shape is None or len(shape) != 2:
        return None
    transposed = transposed_default != flipped
    in_f, out_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    return LinearInfo(node, x, wnode, transposed, b, int(in_f), int(out_f))


def _einsum_linear(node: fx.Node) -> tuple[fx.Node, fx.Node, bool, str] | None:
    """(x, weight operand, weight stored [out, in], the equation with x's leading dims as "...") when
    `aten.einsum(equation, [a, b])` is a linear on the last dimension of one operand, else None."""
    eq, operands = (node.args[0], node.args[1]) if len(node.args) >= 2 else (None, None)
    if not isinstance(eq, str) or not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    eq = eq.replace(" ", "")
    if eq.count("->") != 1:
        return None  # implicit output (alphabetical order): not worth guessing
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return None
    for wi in (1, 0):
        w, x, ws, xs = operands[wi], operands[1 - wi], subs[wi], subs[1 - wi]
        if not isinstance(w, fx.Node) or not isinstance(x, fx.Node) or _param_source(w) is None:
            continue
        ellipsis = xs.startswith("...")
        letters = xs[3:] if ellipsis else xs
        if len(ws) != 2 or ws[0] == ws[1] or not ws.isalpha() or not letters or not letters.isalpha() \
                or len(set(letters)) != len(letters):
            continue
        c = letters[-1]
        if c not in ws:
            continue
        o = ws[1] if ws[0] == c else ws[0]
        if o in letters or out != ("..." if ellipsis else "") + letters[:-1] + o:
            continue
        pieces = ["..." + c, ws]
        if wi == 0:
            pieces.reverse()
        return x, w, ws[0] == o, ",".join(pieces) + "->..." + o
    return None


def einsum_equation(node: fx.Node) -> str | None:
    """For an einsum linear (`linear_info` accepts it), its equation with the activation's leading
    dimensions written as "..." (so a copy of the node runs on any number of leading dims)."""
    if packet(node) is not aten.einsum:
        return None
    form = _einsum_linear(node)
    return form[3] if form is not None else None


def last_dim_part(node: fx.Node) -> tuple[fx.Node | None, fx.Node, int, int] | None:
    """(split node or None, source, lo, hi) when `node` is the contiguous range [lo, hi) of the last
    dimension of `source`: `getitem(split/chunk(source, ..., dim=-1), i)`, `slice(source, -1, lo,
    hi)` (step 1) or `narrow(source, -1, lo, n)`; else None. Sizes must be static."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        split, i = node.args[0], node.args[1]
        if not isinstance(split, fx.Node) or not is_last_dim_split(split) or not isinstance(i, int):
            return None
        sizes = [o.shape[-1] for o in split.meta["val"]]
        if not all(isinstance(s, int) for s in sizes) or not -len(sizes) <= i < len(sizes):
            return None
        i %= len(sizes)
        lo = sum(sizes[:i])
        return split, split.args[0], lo, lo + sizes[i]
    p = packet(node)
    if p not in (aten.slice, aten.narrow) or not isinstance(node.args[0], fx.Node):
        return None
    src, v = val(node.args[0]), val(node)
    if src is None or v is None or src.dim() != v.dim() or _dim_arg(node, 1, 0) % src.dim() != src.dim() - 1:
        return None
    n, width = src.shape[-1], v.shape[-1]
    if not isinstance(n, int) or not isinstance(width, int):
        return None
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
    step = (node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)) if p is aten.slice else 1
    if step != 1:
        return None  # strided (interleaved gate / up columns): not a contiguous part
    if start is None:
        start = 0
    if not isinstance(start, int):
        return None
    start = max(0, min(n, start + n if start < 0 else start))
    return None, node.args[0], start, start + width


def is_last_dim_split(node: fx.Node) -> bool:
    """A split / chunk of the last dimension (its outputs are list items)."""
    if packet(node) not in SPLIT_OPS or not isinstance(node.args[0], fx.Node):
        return False
    src, outs = val(node.args[0]), node.meta.get("val")
    if src is None or src.dim() == 0 or not isinstance(outs, (list, tuple)):
        return False
    return _dim_arg(node, 2, 0) % src.dim() == src.dim() - 1


def _dim_arg(node: fx.Node, index: int, default: int) -> int:
    d = node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)
    return d if isinstance(d, int) else default


def is_tokenwise(node: fx.Node) -> bool:
    """Whether `node` treats each token independently (see the module docstring)."""
    p = packet(node)
    if p in ELEMENTWISE_OPS or p in VIEW_OPS:
        return True
    if p in LAST_DIM_OPS:
        v, src = val(node), val(node.args[0]) if node.args else None
        if p in (aten.layer_norm, aten.rms_norm):
            return True
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if src is None or v is None or not dims:
            return False
        return all(d in (-1, src.dim() - 1) for d in dims) and v.dim() == src.dim()
    return False


def is_view(node: fx.Node) -> bool:
    """A view/reshape that keeps the last dimension (only leading dims change)."""
    if packet(node) not in VIEW_OPS:
        return False
    a, v = val(node.args[0]), val(node)
    return a is not None and v is not None and a.dim() >= 1 and v.dim() >= 1 and same_size(a.shape[-1], v.shape[-1])


def attr_value(gm: fx.GraphModule, target: str):
    """The object a get_attr target ("transformer.h.0.mlp.c_fc.weight") names on `gm`."""
    return operator.attrgetter(target)(gm)


def common_module_path(nodes) -> list[str]:
    """The common prefix of the innermost `nn_module_stack` paths of `nodes` (nodes without that
    metadata are skipped), as path parts; [] when there is none."""
    common: list[str] | None = None
    for n in nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        path = list(stack.values())[-1][0].split(".")
        if common is None:
            common = path
            continue
        i = 0
        while i < min(len(common), len(path)) and common[i] == path[i]:
            i += 1
        common = common[:i]
    return common or []


def same_size(a, b) -> bool:
    """Equality of two (possibly symbolic) sizes without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def strip_views(node: fx.Node) -> fx.Node:
    """Follow views back to the node that produced the values."""
    while isinstance(node, fx.Node) and is_view(node):
        node = node.args[0]
    return node
