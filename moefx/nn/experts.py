"""Experts with stacked weights, run two ways (the lowering pass picks one per graph).

Buffer path, `experts(buf)`: buf [E, C, d] -> [E, C, d], every expert applied to its own C rows,
batched over the expert dimension (many tokens per expert). Gather path, `experts(tokens, expert)`:
tokens [S, d] and each token's chosen experts expert [S, k] -> [S, k, d], no capacity, each used
expert's weights read once where they live:
- plain eager on the CPU (`gather_by_expert`): the choices are grouped on the host and each used
  expert's whole FFN runs on its rows, the fewest ops for a decode step's handful of rows;
- traced (export, compile) or on CUDA: the S k choices are sorted by expert and each group is
  multiplied by its expert's weights with `grouped_mm`, static shapes, no host synchronisation;
- where that op would synchronise with the host (CUDA, not bf16), and for `GenericExperts` other
  than in plain eager on the CPU: the chosen weights are copied out by index and applied batched
  (no host synchronisation: CUDA graphs).

`StackedExperts` holds the ups/down weights of E copies of one FFN stacked on a leading expert
dimension and runs them with bmm/baddbmm: h_j = buf @ W_up_j + b_up_j, m = middle(h_1, ..., h_n)
(the FFN's own token-wise ops, copied from the graph: GELU, SwiGLU's silu(g) * u, ...),
y = m @ W_down + b_down. Partitioning takes experts by index (`select`) or slices the inner
dimension of every expert (`slice_inner`, expert slicing).
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, fx, nn

from .gating_ops import plain_eager
from .grouped_ops import copy_free, grouped_mm
from .products import rows_by_reduction


def gather_by_expert(x: Tensor, idx: Tensor, ffn) -> Tensor:
    """x [N, d], idx [N] -> [N, d_out], planned on the host: ffn(g, rows) runs once per used expert g
    on the rows that chose it (sorted by expert, put back in order). Reads idx on the host, so it is
    for plain eager use, where that costs nothing: a decode step's handful of rows then takes the
    fewest ops and reads each used expert's weights once, in place."""
    ids = idx.tolist()
    if not ids or all(i == ids[0] for i in ids):   # one expert for every row (batch 1, top-1): no permutation
        return ffn(ids[0] if ids else 0, x)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    permuted = order != list(range(len(ids)))
    if permuted:
        x = x[order]
    ys, start = [], 0
    for g, run in itertools.groupby(order, key=ids.__getitem__):
        end = start + len(list(run))
        ys.append(ffn(g, x[start:end]))
        start = end
    y = torch.cat(ys)
    if permuted:
        y = torch.empty_like(y).index_copy(0, torch.tensor(order, device=y.device), y)
    return y


class Experts(nn.Module):
    """What every experts module of an MoE layer is (the protocol the passes, partitioning and the
    gather path use): E copies of one token-wise FFN, `first_expert` the global index of this
    module's expert 0, `bias_scale` the scale of the down bias (0 on all but one expert slice).

    forward(buf [E, C, d]) -> [E, C, d] is the buffer path; forward(tokens [S, d], expert [S, k])
    -> [S, k, d] the gather path: in plain eager on the CPU the choices are grouped on the host and
    `expert_ffn(g, rows)` runs once per used expert (`gather_by_expert`), otherwise the subclass's
    `gather_traced(x, idx)` multiplies without host synchronisation. Subclasses implement
    `num_experts`, `d`, `f`, `buffer`, `expert_ffn`, `gather_traced`, `select` and `slice_inner`.
    """

    first_expert: int = 0
    bias_scale: float = 1.0

    @property
    def sliceable(self) -> bool:
        """Whether the inner dimension f can be split exactly (expert slicing, tensor parallelism)."""
        return False

    @staticmethod
    def inner_dim(param: str) -> int | None:
        """The dimension of parameter `param` that indexes f (None: none, or never sliced)."""
        return None

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def d(self) -> int:
        raise NotImplementedError

    @property
    def f(self) -> int:
        raise NotImplementedError

    def forward(self, buf: Tensor, expert: Tensor | None = None) -> Tensor:
        """buf [E, C, d] -> [E, C, d]: every expert applied to its own C rows; or, with `expert`
        [S, k], tokens [S, d] -> [S, k, d]: each token through its k chosen experts (gather path)."""
        if expert is None:
            return self.buffer(buf)
        S, k = expert.shape
        idx = (expert - self.first_expert if self.first_expert else expert).reshape(-1)   # [N = S k]
        x = buf.repeat_interleave(k, dim=0) if k > 1 else buf                  # [N, d]
        if x.device.type == "cpu" and plain_eager(x):   # weights read in place, once per used expert
            y = gather_by_expert(x, idx, self.expert_ffn)
        else:
            y = self.gather_traced(x, idx)
        return y.reshape(S, k, -1)

    def buffer(self, buf: Tensor) -> Tensor:
        """buf [E, C, d] -> [E, C, d] (the buffer path)."""
        raise NotImplementedError

    def expert_ffn(self, g: int, rows: Tensor) -> Tensor:
        """rows [n, d] through expert g's FFN (local index) -> [n, d]."""
        raise NotImplementedError

    def gather_traced(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] (local expert of each row) -> [N, d], without host synchronisation."""
        raise NotImplementedError

    def select(self, start: int, stop: int) -> "Experts":
        """A new module with experts [start, stop) (weights copied, so shards do not alias)."""
        raise NotImplementedError

    def slice_inner(self, index: int, parts: int) -> "Experts":
        """Expert slicing: part `index` of `parts` of every expert's inner dimension f."""
        raise ValueError("expert slicing (more ranks than experts) needs stacked experts: this layer's FFN has "
                         "inner matrices, so give it an ep that divides its expert count")


class StackedExperts(Experts):
    """E FFN experts with stacked weights.

    up_weights: list of [E, d, f], one per f-wide input of the middle (one per up projection, two
    for gated FFNs; a fused up projection d -> k f gives one per part it is cut into, each that
    chunk of the fused weight), up_biases: list of [E, f] or None, down_weight: [E, f, d],
    down_bias: [E, d] or None, middle: a GraphModule taking the up outputs and returning the down
    input (token-wise, any leading shape); elementwise: the middle treats each element of f on its
    own, so every expert can be sliced over f exactly (`slice_inner`).
    """

    def __init__(self, up_weights: list[Tensor], up_biases: list[Tensor | None], down_weight: Tensor,
                 down_bias: Tensor | None, middle: fx.GraphModule, activation: str = "custom",
                 first_expert: int = 0, bias_scale: float = 1.0, elementwise: bool = True):
        super().__init__()
        self.up_weight = nn.ParameterList([nn.Parameter(w) for w in up_weights])
        self.up_has_bias = [b is not None for b in up_biases]
        self.up_bias = nn.ParameterList([nn.Parameter(b) for b in up_biases if b is not None])
        self.down_weight = nn.Parameter(down_weight)
        self.down_bias = nn.Parameter(down_bias) if down_bias is not None else None
        self.middle = middle
        self.activation = activation
        self.first_expert = first_expert  # global index of expert 0 of this module (after partition)
        self.bias_scale = bias_scale  # 0 on all but one rank when the inner dim is sliced
        self.elementwise = elementwise  # the middle treats each element of f on its own
        # how a traced gather path multiplies: "grouped" (grouped_mm) or "reduce" (rows_by_reduction,
        # set on a compiled decode graph's copy by moefx.passes.reduce_products)
        self.products = "grouped"

    @property
    def sliceable(self) -> bool:
        return self.elementwise

    @staticmethod
    def inner_dim(param: str) -> int | None:
        """The dimension of parameter `param` that indexes f (None: the down bias, which has none)."""
        if param.startswith("up_weight."):
            return 2
        if param.startswith("up_bias.") or param == "down_weight":
            return 1
        if param == "down_bias":
            return None
        raise KeyError(f"StackedExperts has no parameter {param!r}")

    @property
    def num_experts(self) -> int:
        return self.down_weight.shape[0]

    @property
    def d(self) -> int:
        return self.down_weight.shape[2]

    @property
    def f(self) -> int:
        return self.down_weight.shape[1]

    def buffer(self, buf: Tensor) -> Tensor:
        """buf [E, C, d] -> [E, C, d] with bmm / baddbmm over the stacked weights."""
        biases = iter(self.up_bias)
        hs = []
        for w, has_b in zip(self.up_weight, self.up_has_bias):
            if has_b:
                hs.append(torch.baddbmm(next(biases).unsqueeze(1).to(buf.dtype), buf, w.to(buf.dtype)))
            else:
                hs.append(torch.bmm(buf, w.to(buf.dtype)))
        m = self.middle(*hs)
        w2 = self.down_weight.to(m.dtype)
        if self.down_bias is None:
            return torch.bmm(m, w2)
        if self.bias_scale != 1.0:
            return torch.baddbmm(self.down_bias.unsqueeze(1).to(m.dtype), m, w2, beta=self.bias_scale)
        return torch.baddbmm(self.down_bias.unsqueeze(1).to(m.dtype), m, w2)

    def _biases(self) -> list[Tensor | None]:
        """The up projections' biases, None where one has none."""
        return [b for _, b in self._up_pairs()]

    def _up_pairs(self) -> list[tuple[Tensor, Tensor | None]]:
        """(up weight, its bias or None) per up projection, read from the lists' parameter dicts:
        iterating a ParameterList costs an attribute lookup per item, which a decode step feels."""
        biases = iter(self.up_bias._parameters.values())
        return [(w, next(biases) if has else None)
                for w, has in zip(self.up_weight._parameters.values(), self.up_has_bias)]

    def gather_traced(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] -> [N, d]: `_gather_reduce` when `products` is "reduce", `_gather_grouped`
        where grouped_mm needs no host synchronisation, else `_gather_copies`."""
        if self.products == "reduce":
            return self._gather_reduce(x, idx)
        if copy_free(x):
            return self._gather_grouped(x, idx)
        return self._gather_copies(x, idx)

    def expert_ffn(self, g: int, rows: Tensor) -> Tensor:
        """rows [n, d] through expert g's FFN -> [n, d], with mm / addmm on views of its weights.

        Called once per used expert and MoE layer in an eager decode step, where each Python-level
        step is paid with caches just flushed by the weight reads: no casts or lookups it can skip."""
        dt = rows.dtype
        hs = []
        for w, b in self._up_pairs():
            w = w[g]
            if w.dtype != dt:
                w = w.to(dt)
            if b is None:
                hs.append(torch.mm(rows, w))
            else:
                b = b[g]
                hs.append(torch.addmm(b if b.dtype == dt else b.to(dt), rows, w))
        m = self.middle.forward(*hs)   # a GraphModule of token-wise ops (no hooks): its __call__ costs more
        dm = m.dtype                   # the middle may cast (T5 casts to the down weight's dtype)
        w2 = self.down_weight[g]
        if w2.dtype != dm:
            w2 = w2.to(dm)
        if self.down_bias is None:
            return torch.mm(m, w2)
        b2 = self.down_bias[g]
        if b2.dtype != dm:
            b2 = b2.to(dm)
        if self.bias_scale != 1.0:
            return torch.addmm(b2, m, w2, beta=self.bias_scale)
        return torch.addmm(b2, m, w2)

    def _gather_grouped(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] -> [N, d]: the rows sorted by expert, each group times its expert's
        weights with `grouped_mm` (static shapes, no host synchronisation in the graph), put back."""
        N = idx.shape[0]
        if N > 1:  # static: a decode graph knows N
            order = idx.argsort(stable=True)
            idx, x = idx.index_select(0, order), x.index_select(0, order)
        groups = torch.arange(self.num_experts, device=idx.device, dtype=idx.dtype)
        offs = torch.searchsorted(idx, groups, right=True).to(torch.int32)    # [E] group ends
        y = self._ffn_by(x, idx, lambda rows, w: grouped_mm(rows, w, offs))
        if N > 1:
            y = torch.empty_like(y).index_copy(0, order, y)
        return y

    def _gather_reduce(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] -> [N, d]: each row times its own expert's weights as reductions
        (`rows_by_reduction`), for a compiled step of a few rows: no sort, no offsets, no custom op;
        a weight two rows share is read twice, so it is for N of at most a few rows."""
        return self._ffn_by(x, idx, lambda rows, w: rows_by_reduction(rows, w, idx))

    def _ffn_by(self, x: Tensor, idx: Tensor, product) -> Tensor:
        """x [N, d] -> [N, d] through each row's expert (idx [N] picks the biases): product(rows, w)
        multiplies the rows by their experts' slices of a stacked weight w [E, in, out]."""
        hs = []
        for w, b in self._up_pairs():
            h = product(x, w.to(x.dtype))
            hs.append(h if b is None else h + b.index_select(0, idx).to(h.dtype))
        m = self.middle(*hs)
        y = product(m, self.down_weight.to(m.dtype))
        if self.down_bias is not None:
            y = y + self.down_bias.index_select(0, idx).to(y.dtype) * self.bias_scale
        return y

    def _gather_copies(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] -> [N, d] with each row's expert weights copied out by index_select and
        applied with bmm: no host synchronisation on any device (CUDA graphs), 3 reads per weight."""
        x = x.unsqueeze(1)                                                      # [N, 1, d]
        hs = []
        for w, b in self._up_pairs():
            w = w.index_select(0, idx).to(x.dtype)                              # [N, d, f]
            hs.append(torch.bmm(x, w) if b is None else torch.baddbmm(b.index_select(0, idx).unsqueeze(1).to(x.dtype),
                                                                      x, w))
        m = self.middle(*hs)
        w2 = self.down_weight.index_select(0, idx).to(m.dtype)
        if self.down_bias is None:
            return torch.bmm(m, w2).squeeze(1)
        return torch.baddbmm(self.down_bias.index_select(0, idx).unsqueeze(1).to(m.dtype), m, w2,
                             beta=self.bias_scale).squeeze(1)

    def with_products(self, products: str) -> "StackedExperts":
        """A copy sharing every parameter, buffer and submodule, whose traced gather path multiplies
        by `products` ("grouped" or "reduce"); registering on one never changes the other."""
        new = copy.copy(self)
        new._parameters, new._buffers, new._modules = dict(self._parameters), dict(self._buffers), dict(self._modules)
        new.products = products
        return new

    def select(self, start: int, stop: int) -> "StackedExperts":
        """A new module with experts [start, stop) (weights copied, so shards do not alias)."""
        return StackedExperts([w.detach()[start:stop].clone() for w in self.up_weight],
                              [None if b is None else b.detach()[start:stop].clone() for b in self._biases()],
                              self.down_weight.detach()[start:stop].clone(),
                              None if self.down_bias is None else self.down_bias.detach()[start:stop].clone(),
                              self.middle, self.activation, self.first_expert + start, self.bias_scale,
                              self.elementwise)

    def slice_inner(self, index: int, parts: int) -> "StackedExperts":
        """Expert slicing: part `index` of `parts` of every expert's inner dimension f.

        Only valid when the middle ops are elementwise over f (true for GELU/ReLU/SwiGLU FFNs); the
        down bias is kept at full scale on part 0 and zeroed elsewhere, so summing the parts'
        outputs (an all-reduce) gives the full expert output.
        """
        if not self.elementwise:
            raise ValueError("this FFN's middle is not elementwise over f (a norm / softmax over it): it cannot be "
                             "sliced exactly")
        if self.f % parts:
            raise ValueError(f"inner size f = {self.f} is not divisible by {parts} expert slices")
        lo, hi = index * self.f // parts, (index + 1) * self.f // parts
        return StackedExperts([w.detach()[:, :, lo:hi].clone() for w in self.up_weight],
                              [None if b is None else b.detach()[:, lo:hi].clone() for b in self._biases()],
                              self.down_weight.detach()[:, lo:hi, :].clone(),
                              None if self.down_bias is None else self.down_bias.detach().clone(),
                              self.middle, self.activation, self.first_expert,
                              self.bias_scale if index == 0 else 0.0, self.elementwise)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, d={self.d}, f={self.f}, ups={len(self.up_weight)}, "
                f"activation={self.activation}")


class GenericExperts(Experts):
    """E copies of any token-wise FFN subgraph, run batched with torch.vmap over the experts.

    template: a GraphModule computing the dense FFN on [C, d] -> [C, d], whose parameters are
    non-persistent meta buffers (placeholders); params: for each of them, the stacked [E, ...] values,
    held here as parameters of the same (flat) names. forward(buf [E, C, d]) calls the template once
    per expert through `torch.func.functional_call`, vectorised by `torch.vmap`.
    """

    def __init__(self, template: fx.GraphModule, params: dict[str, Tensor], d: int, f: int,
                 activation: str = "custom", first_expert: int = 0):
        super().__init__()
        self.template = template
        self.expert_params = nn.ParameterDict({k: nn.Parameter(v) for k, v in params.items()})
        self._d, self._f = d, f
        self.activation = activation
        self.first_expert = first_expert
        self.bias_scale = 1.0

    @property
    def num_experts(self) -> int:
        return next(iter(self.expert_params.values())).shape[0]

    @property
    def d(self) -> int:
        return self._d

    @property
    def f(self) -> int:
        return self._f

    def _one(self, values: tuple, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.template, dict(zip(self.expert_params.keys(), values)), (x,))

    def buffer(self, buf: Tensor) -> Tensor:
        """buf [E, C, d] -> [E, C, d]: the template once per expert, vectorised by torch.vmap."""
        return torch.vmap(self._one)(tuple(self.expert_params.values()), buf)

    def gather_traced(self, x: Tensor, idx: Tensor) -> Tensor:
        """x [N, d], idx [N] -> [N, d]: each row's expert parameters copied out (no host sync), vmapped."""
        params = tuple(p.index_select(0, idx) for p in self.expert_params.values())
        return torch.vmap(self._one)(params, x.unsqueeze(1)).squeeze(1)

    def expert_ffn(self, g: int, rows: Tensor) -> Tensor:
        """rows [n, d] through expert g's FFN (the template with views of its parameters) -> [n, d]."""
        params = {n: p[g] for n, p in self.expert_params.items()}
        return torch.func.functional_call(self.template, params, (rows,))

    def select(self, start: int, stop: int) -> "GenericExperts":
        """A new module with experts [start, stop) (weights copied)."""
        return GenericExperts(self.template, {k: v.detach()[start:stop].clone() for k, v in self.expert_params.items()},
                              self._d, self._f, self.activation, self.first_expert + start)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d={self.d}, f={self.f}, generic, activation={self.activation}"
