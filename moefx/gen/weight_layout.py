"""Weight layout for decoding on the CPU: the longer of a matrix's two dimensions contiguous.

A decode step at a small batch multiplies a few rows by every weight matrix once, so it runs at
the rate the CPU streams a matrix through a matrix-vector product. That rate depends on the
layout, not on the op: with one thread, a [2048, 512] matrix whose rows are 512 floats streams at
about half the rate of the same matrix stored with rows of 2048 floats, whether it is read as
`F.linear(x, W)` or `x @ W` (`benchmarks/bench_gemv_layout_cpu.py`). nn.Linear stores [out, in],
so every up projection (and a tied embedding / LM head, [vocab, d]) has the slow layout.
The gain is a matrix-vector product's: with 4 or more rows per product MKL runs a small matrix
product that the layout slows a little or not at all (0.8-1.1x), so "auto" re-strides only for
decode steps of at most `LONG_ROWS_MAX_TOKENS` rows; a prompt's prefill runs on the same weights.

`long_rows(gm)` re-strides such parameters in place: same Parameter objects (graphs, tied uses
and optimizers keep pointing at them), same shapes and values, only the memory order of the last
two dimensions swapped so the longer one is contiguous. It takes only parameters that every use
in the graph reads through a stride-agnostic matrix op (linear, mm, addmm, matmul, embedding,
or a transpose feeding one; the BLAS calls take a transposed operand at no cost) and the stacked
expert weights (`StackedExperts`, which run bmm / mm / grouped_mm); a weight that is viewed,
flattened or convolved keeps its layout. Matrix products may sum in a different order (a few
ulps). `moefx.save` writes contiguous copies; a state_dict of the graph holds the strided tensors.

A compiled decode step whose products are reductions (`Generator.compile(products="reduce")`,
`moefx.passes.reduce_products`) wants the opposite for its linears: `input_contiguous` stores
each weight those reductions read with the dimension they sum over contiguous (nn.Linear's own
layout for linears; dimension -2 for stacked experts), in place like `long_rows`.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..analysis.linear import attr_value
from ..nn.experts import StackedExperts
from ..nn.products import linear_by_reduction

LAYOUTS = ("auto", "long_rows", "keep")
LONG_ROWS_MAX_TOKENS = 2   # rows per decode step up to which "auto" picks long rows (see above)

_aten = torch.ops.aten
_MATRIX_READS = {_aten.linear.default, _aten.mm.default, _aten.addmm.default, _aten.matmul.default,
                 _aten.embedding.default}
_TRANSPOSES = {_aten.t.default, _aten.transpose.int, _aten.permute.default}
_MODULE_READS = (nn.Linear, nn.Embedding, StackedExperts)


def short_rows(t: torch.Tensor) -> bool:
    """Whether t is a contiguous floating matrix (or stack of them) whose rows are its shorter
    dimension: the layout `long_rows` changes."""
    return (t.dim() >= 2 and t.is_floating_point() and t.is_contiguous() and t.shape[-1] < t.shape[-2]
            and t.shape[-1] > 1)


def _read_as_matrix(node: fx.Node) -> bool:
    """Whether every use of node's value is a matrix op that takes any strides."""
    for user in node.users:
        if user.op != "call_function":
            return False
        if user.target in _TRANSPOSES:
            if not all(u.op == "call_function" and u.target in _MATRIX_READS for u in user.users):
                return False
        elif user.target not in _MATRIX_READS:
            return False
    return True


def restridable(gm: fx.GraphModule) -> dict[int, nn.Parameter]:
    """The parameters of gm that `long_rows` may re-stride, by id: those of get_attr nodes whose
    every use is a matrix op, and those of the Linear / Embedding / StackedExperts modules the graph
    calls."""
    ok: dict[int, nn.Parameter] = {}
    bad: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = attr_value(gm, node.target)
            if isinstance(t, nn.Parameter):
                if _read_as_matrix(node):
                    ok[id(t)] = t
                else:
                    bad.add(id(t))
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _MODULE_READS):
                ok.update((id(p), p) for p in mod.parameters())
    return {key: p for key, p in ok.items() if key not in bad}


def long_rows(*graphs: fx.GraphModule) -> int:
    """Re-stride, in place, every parameter of the graphs that `restridable` allows and that has
    `short_rows`, so that its longer dimension is contiguous (see the module docstring). A
    parameter the graphs share (a generator's prefill and decode) changes only if every graph
    allows it. Returns how many changed."""
    allowed: dict[int, nn.Parameter] = {}
    refused: set[int] = set()
    for gm in graphs:
        mine = restridable(gm)
        allowed.update(mine)
        refused |= {id(p) for p in gm.parameters()} - set(mine)
    changed = 0
    with torch.no_grad():
        for key, p in allowed.items():
            if key not in refused and short_rows(p):
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
                changed += 1
    return changed


def input_contiguous(gm: fx.GraphModule) -> int:
    """Re-stride, in place, the weights that the reductions of a `reduce_products` graph read, so
    that each stores the dimension its product sums over contiguously: every `linear_by_reduction`
    weight row-major (nn.Linear's own [out, in]; making a tensor contiguous never breaks another
    use) and the stacked weights of every experts module with products "reduce" ([E, d, f] up and
    [E, f, d] down, dimension -2 contiguous; StackedExperts take any strides). The same Parameter
    objects change, so graphs sharing them see the new layout. Returns how many changed."""
    params: dict[int, tuple[nn.Parameter, str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is linear_by_reduction:
            p = attr_value(gm, node.args[1].target)
            params[id(p)] = (p, "rows")
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, StackedExperts) and mod.products == "reduce":
                params.update((id(p), (p, "columns")) for p in (*mod.up_weight, mod.down_weight))
    changed = 0
    with torch.no_grad():
        for p, order in params.values():
            if order == "rows" and not p.is_contiguous():
                p.data = p.data.contiguous()
            elif order == "columns" and p.stride(-2) != 1:
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
            else:
                continue
            changed += 1
    return changed


def resolve(layout: str, device: torch.device | None, tokens: int = 1) -> str:
    """The layout to use for decode steps of `tokens` rows on `device`: "auto" is "long_rows" on the
    CPU for at most LONG_ROWS_MAX_TOKENS rows, else "keep" (GPU matrix products are not bound by
    this, and some kernels want row-major weights). device is only read for "auto"."""
    if layout not in LAYOUTS:
        raise ValueError(f"weight_layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "auto":
        return "long_rows" if device is not None and device.type == "cpu" and tokens <= LONG_ROWS_MAX_TOKENS \
            else "keep"
    return layout
