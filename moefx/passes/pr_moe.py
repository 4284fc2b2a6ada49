"""PR-MoE rewrite: replace selected FFN regions by (residual) MoE layers made of graph nodes.

Runs first, on a captured dense graph. Needs: FFNs recognisable by `moefx.analysis.find_ffns`.
Produces, for every block i with (i + 1) % every == 0, the nodes

    tokens  = aten.reshape(X, [-1, d])              role router
    logits  = moe{L}.router(tokens)                 Linear(d, E, bias=False) in fp32
    routing = moe{L}.gate(logits)                   moefx.route -> Routing (mapping table)
    aux     = routing[5]; moe{L}.aux(aux)           load-balancing loss sink
    buf     = moefx.dispatch(tokens, routing, E)    [E, C, d]
    y_buf   = moe{L}.experts(buf)                   batched experts (bmm)
    moe_out = moefx.combine(y_buf, routing)         [S, d]
    # residual (PR-MoE): the dense FFN nodes stay and
    coef    = softmax(moe{L}.coef(tokens))          Linear(d, 2)
    out     = moe_out * coef[:, 0:1] + reshape(mlp_out, [-1, d]) * coef[:, 1:2]

and rewires the FFN's users to `out` (reshaped like X). Without `residual` the dense FFN nodes
are removed. Every created node carries moefx_pass="pr_moe", its role and layer.

Function preservation with init="upcycle": every expert is a copy of the dense FFN, so with
dropless routing each token's expert output equals the dense output. Top-1 weights are
p / p.detach() (value 1, gradient of p: `MoEPlan.combine_weight = "unit"`), top-k weights are
renormalised to sum to 1, and the residual mix has c0 + c1 = 1 for any coef weights: the
converted model computes the dense function. `init_noise` > 0 perturbs the copies (breaks
expert symmetry) and preservation then holds only approximately.
Does not handle: FFNs whose middle contains matrix parameters (not recognised as FFNs).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from .. import meta as M
from ..analysis.ffn import FFN, find_ffns
from ..analysis.linear import attr_value, aten, is_side_effect, is_view, linear_info, packet, strip_views, val
from ..errors import AnalysisError
from ..nn.aux import AuxLossSink
from ..nn.experts import GenericExperts, StackedExperts
from ..nn.moe import Gate, MoELayer, Router
from ..nn.routing import combine, dispatch
from .infra import NodeBuilder, copy_graph_module

NAME = "pr_moe"


def pr_moe(gm: fx.GraphModule, plan) -> fx.GraphModule:
    """Rewrite the FFNs that `plan.moe` selects into MoE layers. Returns a new GraphModule."""
    moe = plan.moe
    if moe is None:
        return gm
    ffns = find_ffns(gm)
    if not ffns:
        raise AnalysisError("no position-wise FFN (linear d->f, token-wise ops, linear f->d) was found in the "
                            "graph; moefx.find_ffns(gm) shows what the analysis sees")
    layer_experts = moe.layer_experts(len(ffns))
    new = copy_graph_module(gm)
    by_name = {n.name: n for n in new.graph.nodes}
    for ffn in ffns:
        for name in ffn.nodes:
            by_name[name].meta[M.BLOCK] = ffn.block
            by_name[name].meta[M.ROLE] = "ffn"
    for layer, (block, num_experts) in enumerate(layer_experts.items()):
        _rewrite(new, by_name, ffns[block], num_experts, layer, moe)
    new.graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    new.meta["moefx_counters"] = {**new.meta.get("moefx_counters", {}), NAME: len(layer_experts)}
    new.meta["moefx_num_blocks"] = len(ffns)
    new.recompile()
    return new


def _rewrite(gm: fx.GraphModule, by_name: dict, ffn: FFN, num_experts: int, layer: int, moe) -> None:
    x, out = by_name[ffn.input], by_name[ffn.output]
    d = ffn.d
    mod = _make_layer(gm, by_name, ffn, num_experts, layer, moe)
    prefix = f"moe{layer}"
    gm.add_submodule(prefix, mod)

    b = NodeBuilder(gm.graph, out, NAME, layer, ffn.block)
    tokens = b("call_function", aten.reshape.default, (x, [-1, d]), role="router")
    logits = b("call_module", f"{prefix}.router", (tokens,), role="router")
    routing = b("call_module", f"{prefix}.gate", (logits,), role="route")
    aux = b("call_function", operator.getitem, (routing, 5), role="aux")
    b("call_module", f"{prefix}.aux", (aux,), role="aux")
    buf = b("call_function", dispatch, (tokens, routing, num_experts), {"impl": "auto"}, role="dispatch")
    y_buf = b("call_module", f"{prefix}.experts", (buf,), role="experts")
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
        region = {by_name[name] for name in ffn.nodes}
        for node in list(gm.graph.nodes):
            if is_side_effect(node) and any(a in region for a in node.all_input_nodes):
                gm.graph.erase_node(node)


def _make_layer(gm: fx.GraphModule, by_name: dict, ffn: FFN, E: int, layer: int, moe) -> MoELayer:
    ups = [linear_info(by_name[u]) for u in ffn.ups]
    down = linear_info(by_name[ffn.down])
    dense_up = [_matrix(gm, u) for u in ups]
    dense_down = _matrix(gm, down)
    device, dtype = dense_down[0].device, dense_down[0].dtype
    gen = torch.Generator().manual_seed(moe.seed * 100_003 + layer)

    def stack(t: torch.Tensor | None, noisy: bool) -> torch.Tensor | None:
        """E copies of a dense weight (upcycle, optionally noisy) or fresh values (random init)."""
        if t is None:
            return None
        if device.type == "meta":
            return torch.empty((E, *t.shape), device=device, dtype=dtype)
        base = t.detach().unsqueeze(0).expand(E, *t.shape).clone()
        if moe.init == "random":
            std = float(t.detach().float().std()) if t.dim() > 1 else 0.0
            base = (torch.randn(base.shape, generator=gen) * std).to(device, dtype) if t.dim() > 1 \
                else torch.zeros_like(base)
        elif noisy and moe.init_noise > 0:
            scale = moe.init_noise * float(t.detach().float().std())
            base = base + (torch.randn(base.shape, generator=gen) * scale).to(device, dtype)
        return base

    if ffn.stackable and not moe.generic_experts:
        experts = StackedExperts([stack(w, True) for w, _ in dense_up], [stack(b, False) for _, b in dense_up],
                                 stack(dense_down[0], True), stack(dense_down[1], False),
                                 _extract_middle(gm, by_name, ffn, ups, down), ffn.activation)
    else:
        template, dense = _extract_region(gm, by_name, ffn)
        experts = GenericExperts(template, {k: stack(t, t.dim() > 1) for k, t in dense.items()}, ffn.d, ffn.f,
                                 ffn.activation)
    router = Router(_init_uniform((E, ffn.d), ffn.d, gen, device, torch.float32), jitter=moe.noisy_gate == "jitter")
    gate = Gate(E, moe.top_k, moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity, moe.drop_tokens,
                moe.unit_top1, moe.use_rts, moe.noisy_gate)
    coef = None
    if moe.residual:
        coef = nn.Linear(ffn.d, 2, device="meta", dtype=dtype)
        coef.weight = nn.Parameter(_init_uniform((2, ffn.d), ffn.d, gen, device, dtype))
        coef.bias = nn.Parameter(_init_uniform((2,), ffn.d, gen, device, dtype))
    return MoELayer(router, gate, experts, coef, AuxLossSink(moe.aux_loss_coef), ffn.block)


def _init_uniform(shape, fan_in: int, gen, device, dtype) -> torch.Tensor:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)) drawn from a seeded generator; empty on meta."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=gen).to(device)


def _matrix(gm: fx.GraphModule, info) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear's weight as [in, out] (x @ M) and its bias, from the module's parameters."""
    w = attr_value(gm, info.weight.target)
    m = w.detach().t() if info.transposed else w.detach()
    bias = attr_value(gm, info.bias.target).detach() if info.bias is not None else None
    return m, bias


def _extract_middle(gm: fx.GraphModule, by_name: dict, ffn: FFN, ups, down) -> fx.GraphModule:
    """The FFN's token-wise ops between ups and down as a GraphModule taking the up outputs.

    Views are dropped (they only reshape leading dims), so it runs on [E, C, f] as well as [S, f].
    """
    graph = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for i, u in enumerate(ups):
        env[u.node] = graph.placeholder(f"h{i}")

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            name = a.target.replace(".", "_")
            if not hasattr(root, name):
                root.register_buffer(name, attr_value(gm, a.target).detach().clone())
            env[a] = graph.get_attr(name)
            return env[a]
        raise AnalysisError(f"FFN middle op reads {a.name}, which is outside the FFN region")

    for name in ffn.middle:
        node = by_name[name]
        if is_view(node):
            env[node] = arg(node.args[0])
            continue
        env[node] = graph.node_copy(node, arg)
    graph.output(env[strip_views(down.x)])
    return fx.GraphModule(root, graph, class_name="FFNMiddle")
pr_moe.name = NAME


def _extract_region(gm: fx.GraphModule, by_name: dict, ffn: FFN) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """The whole FFN region as a GraphModule [C, d] -> [C, d] (the generic experts' template) and its
    parameters by flat name. Views become reshapes to [-1, last dim] so any leading shape works; the
    template's own parameters are meta placeholders (GenericExperts supplies the values)."""
    graph = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, fx.Node] = {by_name[ffn.input]: graph.placeholder("x")}
    params: dict[str, torch.Tensor] = {}

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            name = a.target.replace(".", "_")
            if name not in params:
                params[name] = attr_value(gm, a.target).detach()
                root.register_buffer(name, torch.empty_like(params[name], device="meta"), persistent=False)
            env[a] = graph.get_attr(name)
            return env[a]
        raise AnalysisError(f"FFN of block {ffn.block} reads {a.name}, which is outside the FFN region")

    for name in ffn.nodes:
        node = by_name[name]
        if packet(node) in (aten.view, aten.reshape, aten._unsafe_view):
            env[node] = graph.call_function(aten.reshape.default, (arg(node.args[0]), [-1, int(val(node).shape[-1])]))
        else:
            env[node] = graph.node_copy(node, arg)
    graph.output(graph.call_function(aten.reshape.default, (env[by_name[ffn.output]], [-1, ffn.d])))
    return fx.GraphModule(root, graph, class_name="FFNTemplate"), params
