"""PR-MoE rewrite: replace selected FFN regions by (residual) MoE layers made of graph nodes.

Runs first (stage "convert"), on a captured dense graph. Requires: FFNs recognisable by
`moefx.analysis.find_ffns`. Provides: MoE layers. Produces, for every block i with
(i + 1) % every == 0, the nodes

    tokens  = aten.reshape(X, [-1, d])              role router
    logits  = moe{L}.router(tokens)                 Linear(d, E, bias=False) in fp32
    routing = moe{L}.gate(logits)                   moefx.route -> Routing (mapping table)
    aux     = routing[5]; moe{L}.aux(aux, logits)   load-balancing (+ z-) loss sink
    buf     = moefx.dispatch(tokens, routing, E)    [E, C, d]
    y_buf   = moe{L}.experts(buf)                   batched experts (bmm)
    moe_out = moefx.combine(y_buf, routing)         [S, d]
    # residual (PR-MoE): the dense FFN nodes stay and
    coef    = softmax(moe{L}.coef(tokens))          Linear(d, 2)
    out     = moe_out * coef[:, 0:1] + reshape(mlp_out, [-1, d]) * coef[:, 1:2]

and rewires the FFN's users to `out` (reshaped like X). Without `residual` every node of the dense
FFN region is removed (dropout and casts included, which dead-code elimination would keep), so
its weights leave the model. Every created node carries moefx_pass="pr_moe", its role and layer.

Function preservation with init="upcycle": every expert is a copy of the dense FFN, so with
dropless routing each token's expert output equals the dense output. Top-1 weights are
p / p.detach() (value 1, gradient of p: `MoEPlan.combine_weight = "unit"`), top-k weights are
renormalised to sum to 1, and the residual mix has c0 + c1 = 1 for any coef weights: the
converted model computes the dense function. `init_noise` > 0 perturbs the copies (breaks
expert symmetry) and preservation then holds only approximately.

Values: every new tensor is built from a recipe (`moefx.recipes`), recorded in
`facts(gm).recipes`, so a rank can build exactly its own piece later. On the meta device
the tensors are left empty. Experts are `StackedExperts` (stacked up/down matrices, the FFN's
token-wise middle copied from the graph; a fused up projection d -> k f becomes one stacked
matrix per part the middle reads, each a chunk of the fused weight, so the experts compute the
dense FFN exactly and stay sliceable over f) or, for FFNs with inner matrices or parameters in the
middle (and with `generic_experts`), `GenericExperts` (the FFN subgraph vmapped over stacked
parameters, each expert with its own trainable copy).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .. import meta as M
from ..analysis.ffn import FFN, find_ffns
from ..analysis.linear import (
    aten,
    attr_value,
    einsum_equation,
    is_side_effect,
    is_view,
    linear_info,
    packet,
    strip_views,
    val,
)
from ..errors import AnalysisError
from ..facts import facts, record_facts
from ..nn.aux import AuxLossSink
from ..nn.experts import GenericExperts, StackedExperts
from ..nn.moe import Gate, MoELayer, Router
from ..nn.routing import combine, dispatch
from ..recipes import Copy, StackExperts, Uniform
from .base import Pass, PassContext
from .conditions import FFNS, MOE_LAYERS
from .graph import NodeBuilder, copy_graph_module, drop_unused_attributes

NAME = "pr_moe"


class PrMoE(Pass):
    """Rewrite the FFNs that `plan.moe` selects into MoE layers (see the module docstring)."""

    name = NAME
    stage = "convert"
    requires = (FFNS,)
    provides = (MOE_LAYERS,)

    def applies(self, ctx: PassContext) -> bool:
        return ctx.plan.moe is not None

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        moe = ctx.plan.moe
        ffns = find_ffns(gm)
        layer_experts = moe.layer_experts(len(ffns))
        new = copy_graph_module(gm)
        by_name = {n.name: n for n in new.graph.nodes}
        for ffn in ffns:
            for name in ffn.nodes:
                by_name[name].meta[M.BLOCK] = ffn.block
                by_name[name].meta[M.ROLE] = "ffn"
        recipes = dict(facts(new).recipes)
        for layer, (block, num_experts) in enumerate(layer_experts.items()):
            _rewrite(new, by_name, ffns[block], num_experts, layer, moe, recipes)
        new.graph.eliminate_dead_code()
        new.delete_all_unused_submodules()
        drop_unused_attributes(new)
        record_facts(new, recipes=recipes, counters={**facts(new).counters, NAME: len(layer_experts)},
                     num_blocks=len(ffns))
        return new

    def ensures(self, before, after, ctx) -> None:
        super().ensures(before, after, ctx)
        moe = ctx.plan.moe
        layers = [m for m in after.modules() if isinstance(m, MoELayer)]
        want = len(moe.layer_experts(len(find_ffns(before))))
        if len(layers) != want:
            raise AssertionError(f"pr_moe made {len(layers)} MoE layers, the plan asks for {want}")
        for role in ("route", "dispatch", "experts", "combine"):
            n = sum(1 for node in after.graph.nodes if node.meta.get(M.ROLE) == role)
            if n != want:
                raise AssertionError(f"pr_moe made {n} {role!r} nodes for {want} MoE layers")


PR_MOE = PrMoE()


def _rewrite(gm: fx.GraphModule, by_name: dict, ffn: FFN, num_experts: int, layer: int, moe, recipes: dict) -> None:
    x, out = by_name[ffn.input], by_name[ffn.output]
    d = ffn.d
    prefix = f"moe{layer}"
    mod = _make_layer(gm, by_name, ffn, num_experts, layer, moe, recipes, prefix)
    mod.train(gm.training)  # an eval-captured graph (a generator's) gates with eval settings, no jitter
    gm.add_submodule(prefix, mod)

    b = NodeBuilder(gm.graph, out, NAME, layer, ffn.block)
    tokens = b("call_function", aten.reshape.default, (x, [-1, d]), role="router")
    logits = b("call_module", f"{prefix}.router", (tokens,), role="router")
    routing = b("call_module", f"{prefix}.gate", (logits,), role="route")
    aux = b("call_function", operator.getitem, (routing, 5), role="aux")
    b("call_module", f"{prefix}.aux", (aux, logits), role="aux")
    buf = b("call_function", dispatch, (tokens, routing, num_experts), {"impl": "auto"}, role="dispatch")
    y_buf = b("call_module", f"{prefix}.experts", (buf,), role="experts")
    y_buf.meta[M.PATH] = "buffer"
    moe_out = b("call_function", combine, (y_buf, routing), {"impl": "auto"}, role="combine")
    result = moe_out
    if moe.residual:
        coef_logits = b("call_module", f"{prefix}.coef", (tokens,), role="coef")
        coef = b("call_function", aten._softmax.default, (coef_logits, -1, False), role="coef")
        c0 = b("call_function", aten.slice.Tensor, (coef, 1, 0, 1), role="coef")
        c1 = b("call_function", aten.slice.Tensor, (coef, 1, 1, 2), role="coef")
        mlp_flat = b("call_function", aten.reshape.default, (out, [-1, d]), role="residual")
        moe_part = b("call_function", aten.mul.Tensor, (moe_out, c0), role="mix")
        mlp_part = b("call_function", aten.mul.Tensor, (mlp_flat, c1), role="mix")
        result = b("call_function", aten.add.Tensor, (moe_part, mlp_part), role="mix")
        for name in ffn.nodes:
            by_name[name].meta[M.ROLE] = "residual"
    xv, ov = x.meta.get("val"), out.meta.get("val")
    if xv is not None and ov is not None and ov.dim() == xv.dim():
        result = b("call_method", "view_as", (result, x), role="mix")
    if ov is not None:
        result.meta["val"] = ov  # same shape as the FFN output it replaces; later analyses read it
    created = set(b.created)
    out.replace_all_uses_with(result, delete_user_cb=lambda user: user not in created)
    if not moe.residual:
        _erase_region(gm, [by_name[name] for name in ffn.nodes])


def _erase_region(gm: fx.GraphModule, region: list[fx.Node]) -> None:
    """Erase a replaced FFN region: its nodes (impure ones like dropout included) and the side-effect
    nodes (export's metadata asserts) that read them."""
    members = set(region)
    for node in list(gm.graph.nodes):
        if is_side_effect(node) and any(a in members for a in node.all_input_nodes):
            gm.graph.erase_node(node)
    for node in reversed(region):
        if node.users:
            raise AssertionError(f"pr_moe: {node.name} of the replaced FFN is still read by "
                                 f"{[u.name for u in node.users]}")
        gm.graph.erase_node(node)


def _make_layer(gm: fx.GraphModule, by_name: dict, ffn: FFN, E: int, layer: int, moe, recipes: dict,
                prefix: str) -> MoELayer:
    down = linear_info(by_name[ffn.down])
    ref = attr_value(gm, down.weight.target)
    device, dtype = ref.device, ref.dtype
    meta = device.type == "meta"

    def read(name: str, narrow: dict) -> torch.Tensor:
        t = attr_value(gm, name).detach()
        for d, (lo, hi) in narrow.items():
            t = t.narrow(d, lo, hi - lo)
        return t

    def stacked(local: str, source: str, transpose: bool, tag: str, chunk=None, fill: float = 0.0) -> torch.Tensor:
        dense = attr_value(gm, source)
        recipe = StackExperts(source, E, transpose=transpose, chunk=chunk, init=moe.init, noise=moe.init_noise,
                              key=(moe.seed, layer, tag), fill=fill)
        recipes[f"{prefix}.experts.{local}"] = recipe
        if meta:
            return torch.empty(recipe.shape(tuple(dense.shape)), device="meta", dtype=dense.dtype)
        return recipe.build(read, tuple(dense.shape))

    if ffn.stackable and not moe.generic_experts:
        # one stacked up matrix per part: a fused up's parts are separate matrices (chunks of its weight)
        parts = [(linear_info(by_name[up]), lo, hi) for _, up, lo, hi in _parts(ffn)]
        up_w, up_b, j = [], [], 0
        for i, (u, lo, hi) in enumerate(parts):
            width = hi - lo
            whole = (lo, hi) == (0, u.out_features)
            chunk = None if whole else (0 if u.transposed else 1, lo // width, u.out_features // width)
            up_w.append(stacked(f"up_weight.{i}", u.weight.target, u.transposed, f"up{i}", chunk))
            if u.bias is not None:
                bias_chunk = None if whole else (0, lo // width, u.out_features // width)
                up_b.append(stacked(f"up_bias.{j}", u.bias.target, False, f"up_bias{i}", bias_chunk))
                j += 1
            else:
                up_b.append(None)
        down_w = stacked("down_weight", down.weight.target, down.transposed, "down")
        down_b = stacked("down_bias", down.bias.target, False, "down_bias") if down.bias is not None else None
        middle, consts = _extract_middle(gm, by_name, ffn, down)
        experts = StackedExperts(up_w, up_b, down_w, down_b, middle, ffn.activation,
                                 elementwise=ffn.middle_elementwise)
        recipes.update({f"{prefix}.experts.middle.{k}": Copy(src) for k, src in consts.items()})
    else:
        template, sources, consts = _extract_region(gm, by_name, ffn)
        norm_weights = _norm_weights(by_name, ffn)
        params = {k: stacked(f"expert_params.{k}", src, False, k, fill=1.0 if src in norm_weights else 0.0)
                  for k, src in sources.items()}
        experts = GenericExperts(template, params, ffn.d, ffn.f, ffn.activation)
        recipes.update({f"{prefix}.experts.template.{k}": Copy(src) for k, src in consts.items()})

    def uniform(local: str, shape: tuple, out_dtype) -> torch.Tensor:
        recipe = Uniform(shape, ffn.d, key=(moe.seed, layer, local))
        recipes[f"{prefix}.{local}"] = recipe
        if meta:
            return torch.empty(shape, device="meta", dtype=out_dtype)
        return recipe.build(dtype=out_dtype, device=device)

    router = Router(uniform("router.weight", (E, ffn.d), torch.float32), jitter=moe.noisy_gate == "jitter")
    gate = Gate(E, moe.top_k, moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity, moe.drop_tokens,
                moe.unit_top1, moe.use_rts, moe.noisy_gate)
    coef = None
    if moe.residual:
        coef = nn.Linear(ffn.d, 2, device="meta", dtype=dtype)
        coef.weight = nn.Parameter(uniform("coef.weight", (2, ffn.d), dtype))
        coef.bias = nn.Parameter(uniform("coef.bias", (2,), dtype))
    return MoELayer(router, gate, experts, coef, AuxLossSink(moe.aux_loss_coef, moe.z_loss_coef), ffn.block)


def _norm_weights(by_name: dict, ffn: FFN) -> set[str]:
    """Targets the FFN region reads as a LayerNorm / RMSNorm weight (init="random" sets them to 1)."""
    out = set()
    for name in ffn.nodes:
        node = by_name[name]
        if packet(node) in (aten.layer_norm, aten.rms_norm) and len(node.args) > 2:
            w = node.args[2]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                out.add(w.target)
    return out


def _parts(ffn: FFN) -> tuple:
    """The FFN's parts (an FFN built by hand may leave them out: then one whole part per up)."""
    return ffn.parts or tuple((u, u, 0, ffn.f) for u in ffn.ups)


def _extract_middle(gm: fx.GraphModule, by_name: dict, ffn: FFN, down) -> tuple[fx.GraphModule, dict]:
    """The FFN's token-wise ops between its parts (the up outputs, or the pieces of a fused up) and
    the down as a GraphModule taking one input per part, and the dense tensor each of its constants
    copies ({buffer name: dense name}).

    Views are dropped (they only reshape leading dims) and last-dim arguments become -1, so it runs
    on [E, C, f] as well as [S, f]. Constants it reads (buffers, never parameters: FFNs with
    parameters there use generic experts) are copied into it.
    """
    graph = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    consts: dict[str, str] = {}
    for i, (node, _, _, _) in enumerate(_parts(ffn)):
        env[by_name[node]] = graph.placeholder(f"h{i}")

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            name = a.target.replace(".", "_")
            if not hasattr(root, name):
                root.register_buffer(name, attr_value(gm, a.target).detach().clone())
                consts[name] = a.target
            env[a] = graph.get_attr(name)
            return env[a]
        raise AnalysisError(f"FFN middle op reads {a.name}, which is outside the FFN region")

    for name in ffn.middle:
        node = by_name[name]
        if is_view(node):
            env[node] = arg(node.args[0])
            continue
        env[node] = _copy_last_dim(graph, node, arg)
    graph.output(env[strip_views(down.x)])
    return fx.GraphModule(root, graph, class_name="FFNMiddle"), consts


def _copy_last_dim(graph: fx.Graph, node: fx.Node, arg) -> fx.Node:
    """Copy a token-wise node into `graph`, with a dim argument that names the last dimension written
    as -1 (the copy then runs on any number of leading dims) and an einsum linear's equation
    written with "..." leading dims."""
    new = graph.node_copy(node, arg)
    p = packet(node)
    eq = einsum_equation(node)
    if eq is not None:
        new.args = (eq, *new.args[1:])
        return new
    index = {aten.slice: 1, aten.narrow: 1, aten.split: 2, aten.split_with_sizes: 2, aten.chunk: 2,
             aten.unsafe_split: 2, aten.unsafe_split_with_sizes: 2, aten.unsafe_chunk: 2,
             aten.mean: 1, aten.sum: 1, aten.amax: 1, aten.softmax: 1, aten._softmax: 1,
             aten.log_softmax: 1, aten._log_softmax: 1}.get(p)
    src = val(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if index is None or src is None or src.dim() == 0:
        return new
    last = src.dim() - 1

    def norm(d):
        return -1 if isinstance(d, int) and d % src.dim() == last else d

    if len(node.args) > index:
        d = node.args[index]
        d = [norm(x) for x in d] if isinstance(d, (list, tuple)) else norm(d)
        new.args = (*new.args[:index], d, *new.args[index + 1:])
    elif "dim" in node.kwargs:
        d = node.kwargs["dim"]
        new.kwargs = {**new.kwargs, "dim": [norm(x) for x in d] if isinstance(d, (list, tuple)) else norm(d)}
    return new


def _extract_region(gm: fx.GraphModule, by_name: dict, ffn: FFN) -> tuple[fx.GraphModule, dict, dict]:
    """The whole FFN region as a GraphModule [C, d] -> [C, d] (the generic experts' template), and,
    by flat name, the dense tensor each of its parameters copies and each of its constants copies.
    Views become reshapes to [-1, last dim] so any leading shape works; the template's own
    parameters are meta placeholders (GenericExperts supplies the values). Buffers the region reads
    stay constants of the template."""
    graph = fx.Graph()
    root = nn.Module()
    root._moefx_placeholders = set()
    env: dict[fx.Node, fx.Node] = {by_name[ffn.input]: graph.placeholder("x")}
    sources: dict[str, str] = {}
    consts: dict[str, str] = {}

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            name = a.target.replace(".", "_")
            value = attr_value(gm, a.target)
            if isinstance(value, nn.Parameter):
                if name not in sources:
                    sources[name] = a.target
                    root.register_buffer(name, torch.empty_like(value, device="meta"), persistent=False)
                    root._moefx_placeholders.add(name)
            elif not hasattr(root, name):
                root.register_buffer(name, value.detach().clone())
                consts[name] = a.target
            env[a] = graph.get_attr(name)
            return env[a]
        raise AnalysisError(f"FFN of block {ffn.block} reads {a.name}, which is outside the FFN region")

    for name in ffn.nodes:
        node = by_name[name]
        if packet(node) in (aten.view, aten.reshape, aten._unsafe_view):
            env[node] = graph.call_function(aten.reshape.default, (arg(node.args[0]), [-1, int(val(node).shape[-1])]))
        else:
            env[node] = _copy_last_dim(graph, node, arg)
    graph.output(graph.call_function(aten.reshape.default, (env[by_name[ffn.output]], [-1, ffn.d])))
    template = fx.GraphModule(root, graph, class_name="FFNTemplate")
    template._moefx_placeholders = root._moefx_placeholders   # meta on purpose: GenericExperts fills them
    return template, sources, consts
