"""Readable views of a (converted) graph: code, a layer table, Graphviz DOT/SVG, JSON."""
from __future__ import annotations

import json
import shutil
import subprocess

import torch
from torch import fx

from . import meta as M
from .count import count_params, human
from .errors import MoefxError
from .analysis.linear import attr_value
from .nn.moe import MoELayer, moe_layers

FORMATS = ("code", "table", "dot", "svg", "json")

_ROLE_COLORS = {"router": "#fde68a", "route": "#fbbf24", "dispatch": "#93c5fd", "experts": "#86efac",
                "combine": "#93c5fd", "residual": "#e5e7eb", "coef": "#fca5a5", "mix": "#fca5a5",
                "collective": "#c4b5fd", "aux": "#fde68a", "ffn": "#e5e7eb"}


def dump(gm: fx.GraphModule, format: str = "code") -> str | bytes:
    """Render `gm` as "code" (Python), "table" (blocks / MoE layers), "dot", "svg" (bytes) or "json"."""
    if format == "code":
        return gm.code
    if format == "table":
        return layer_table(gm)
    if format == "dot":
        return to_dot(gm)
    if format == "svg":
        return to_svg(to_dot(gm))
    if format == "json":
        return json.dumps(to_json(gm), indent=1)
    raise MoefxError(f"unknown dump format {format!r}; choose one of {FORMATS}")


def _named_moe_layers(gm: torch.nn.Module) -> list[tuple[str, MoELayer]]:
    """("moe{L}", module) of every MoE layer of `gm`, in layer order."""
    return [(f"moe{layer}", m) for layer, m in moe_layers(gm)]


def _block_ffn_params(gm: fx.GraphModule) -> dict[int, int]:
    """Parameters of each block's dense FFN (weights/biases read by nodes tagged with the block)."""
    out: dict[int, set] = {}
    for n in gm.graph.nodes:
        if n.meta.get(M.ROLE) in ("ffn", "residual") and M.BLOCK in n.meta:
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    out.setdefault(n.meta[M.BLOCK], set()).add(a.target)
    sizes = {}
    for block, targets in out.items():
        total = 0
        for t in targets:
            total += attr_value(gm, t).numel()
        sizes[block] = total
    return sizes


def layer_table(gm: fx.GraphModule) -> str:
    """One row per block: dense FFN or (PR-)MoE layer, experts, top-k, residual, impl, parameters."""
    impls = {n.meta.get(M.LAYER): n.meta.get(M.IMPL) for n in gm.graph.nodes if n.meta.get(M.ROLE) == "route"}
    moe_by_block = {m.block: (name, m) for name, m in _named_moe_layers(gm)}
    dense = _block_ffn_params(gm)
    blocks = sorted(set(dense) | set(moe_by_block))
    header = ("block", "ffn", "experts", "top_k", "capacity", "residual", "gating", "ffn params", "active/token")
    rows = []
    for b in blocks:
        if b in moe_by_block:
            name, m = moe_by_block[b]
            expert_params = sum(p.numel() for p in m.experts.parameters())
            other = sum(p.numel() for p in m.parameters()) - expert_params + dense.get(b, 0)
            per_expert = expert_params // m.num_experts
            kind = "PR-MoE" if m.coef is not None else "MoE"
            cap = "dropless" if not m.gate.drop_tokens else f"cf={m.gate.capacity_factor:g}"
            layer = int(name[3:])
            rows.append((b, kind, m.num_experts, m.gate.top_k, cap, "yes" if m.coef is not None else "no",
                         impls.get(layer) or m.gate.impl, human(expert_params + other),
                         human(other + per_expert * m.gate.top_k)))
        else:
            rows.append((b, "dense", "-", "-", "-", "-", "-", human(dense[b]), human(dense[b])))
    counts = count_params(gm)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    out.append(f"\nparameters: {counts}")
    return "\n".join(out)


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def _shape(n: fx.Node):
    v = n.meta.get("val")
    return [str(s) for s in v.shape] if isinstance(v, torch.Tensor) else None


def to_json(gm: fx.GraphModule) -> dict:
    """Nodes (name, op, target, inputs, role, block, layer, pass, impl, group, shape), MoE layers, counts."""
    nodes = []
    for n in gm.graph.nodes:
        entry = {"name": n.name, "op": n.op, "target": _target_name(n),
                 "inputs": [a.name for a in n.all_input_nodes]}
        for key, meta_key in (("role", M.ROLE), ("block", M.BLOCK), ("layer", M.LAYER), ("pass", M.PASS),
                              ("impl", M.IMPL), ("group", M.GROUP)):
            if meta_key in n.meta:
                entry[key] = n.meta[meta_key]
        shape = _shape(n)
        if shape is not None:
            entry["shape"] = shape
        nodes.append(entry)
    layers = [{"name": name, "block": m.block, "experts": m.num_experts, "top_k": m.gate.top_k,
               "residual": m.coef is not None, "drop_tokens": m.gate.drop_tokens,
               "capacity_factor": m.gate.capacity_factor, "impl": m.gate.impl,
               "expert_params": sum(p.numel() for p in m.experts.parameters())} for name, m in _named_moe_layers(gm)]
    c = count_params(gm)
    return {"passes": list(getattr(gm, "meta", {}).get("moefx_passes", [])), "nodes": nodes, "moe_layers": layers,
            "params": {"total": c.total, "active": c.active, "expert": c.expert}}


def to_dot(gm: fx.GraphModule) -> str:
    """Graphviz DOT: one box per compute node (parameters omitted), MoE nodes coloured by role,
    clustered by Transformer block."""
    lines = ["digraph moefx {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fillcolor=white, '
             'fontname="Helvetica", fontsize=10];']
    shown = [n for n in gm.graph.nodes if n.op not in ("get_attr",) and not _is_noise(n)]
    ids = {n: f"n{i}" for i, n in enumerate(shown)}
    clusters: dict[int, list[str]] = {}
    for n in shown:
        role = n.meta.get(M.ROLE)
        label = f"{n.name}\\n{_target_name(n)}"
        if M.IMPL in n.meta:
            label += f"\\n[{n.meta[M.IMPL]}]"
        if M.GROUP in n.meta:
            label += f"\\n<{n.meta[M.GROUP]}>"
        color = _ROLE_COLORS.get(role, "white")
        decl = f'  {ids[n]} [label="{_esc(label)}", fillcolor="{color}"];'
        if M.BLOCK in n.meta:
            clusters.setdefault(n.meta[M.BLOCK], []).append(decl)
        else:
            lines.append(decl)
    for b, decls in sorted(clusters.items()):
        lines += [f"  subgraph cluster_block{b} {{", f'    label="block {b}"; color="#9ca3af";', *decls, "  }"]
    for n in shown:
        for a in n.all_input_nodes:
            if a in ids:
                lines.append(f"  {ids[a]} -> {ids[n]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_noise(n: fx.Node) -> bool:
    name = _target_name(n)
    return "_assert_tensor_metadata" in name or "sym_size" in name or n.target == "_guards_fn"


def _esc(s: str) -> str:
    return s.replace('"', '\\"')


def to_svg(dot_source: str) -> bytes:
    """Render DOT with Graphviz's `dot`; a clear error when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise MoefxError("SVG needs Graphviz's `dot` program, which is not installed: install graphviz "
                         "(apt-get install graphviz / brew install graphviz) or use --format dot")
    proc = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise MoefxError(f"dot failed: {proc.stderr.decode(errors='replace')[:500]}")
    return proc.stdout
