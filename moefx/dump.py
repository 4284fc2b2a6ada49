"""Readable views of a (converted) graph: code, a layer table, Graphviz DOT/SVG, JSON.

The DOT view collapses by default: every dense block becomes one summary node (how many ops it
holds, and of which kinds), and so does the dense part of an MoE block (its attention and norms)
and the nodes before the first / after the last block (prologue / epilogue). What the MoE passes
created or tagged stays visible, one box per node, coloured by role (see the legend node).
`expand=True` shows every node. Blocks are found from `node.meta["moefx_block"]` and, for the nodes
the passes did not tag (attention, norms), from the dataflow (`moefx.find_blocks`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from . import meta as M
from .analysis.blocks import find_blocks
from .analysis.linear import attr_value
from .count import count_params, human
from .errors import MoefxError
from .facts import facts, gather_layers
from .nn.moe import MoELayer, moe_layers

FORMATS = ("code", "table", "dot", "svg", "json")

_ROLE_COLORS = {"router": "#fde68a", "route": "#fbbf24", "dispatch": "#93c5fd", "experts": "#86efac",
                "combine": "#67e8f9", "coef": "#fca5a5", "mix": "#fca5a5", "residual": "#d1d5db",
                "collective": "#c4b5fd", "layout": "#fed7aa", "aux": "#f9a8d4", "ffn": "#f3f4f6"}
# Legend rows: (label, role whose colour it shows).
_LEGEND = (("router", "router"), ("route", "route"), ("dispatch", "dispatch"), ("experts", "experts"),
           ("combine", "combine"), ("coef / mix", "coef"), ("residual", "residual"),
           ("collective", "collective"), ("layout", "layout"), ("aux", "aux"), ("dense ffn", "ffn"))
_SUMMARY_COLOR = "#ffffff"
# Roles of the nodes that stay visible inside an MoE block when the view is collapsed.
MOE_VISIBLE_ROLES = ("router", "route", "dispatch", "experts", "combine", "coef", "mix", "aux", "collective",
                     "layout", "residual")
# Op kinds a summary node counts (by the op's base name).
_OP_KINDS = {"matmul": ("addmm", "mm", "bmm", "baddbmm", "linear", "matmul"),
             "attention": ("scaled_dot_product_attention",),
             "norm": ("layer_norm", "native_layer_norm", "rms_norm", "group_norm")}


def dump(gm: fx.GraphModule, format: str = "code", *, expand: bool = False) -> str | bytes:
    """Render `gm` as "code" (Python), "table" (blocks / MoE layers), "dot", "svg" (bytes) or "json".

    expand: dot / svg only: show every node instead of one summary node per dense block.
    """
    if format == "code":
        return gm.code
    if format == "table":
        return layer_table(gm)
    if format == "dot":
        return to_dot(gm, expand=expand)
    if format == "svg":
        return to_svg(to_dot(gm, expand=expand))
    if format == "json":
        return json.dumps(to_json(gm), indent=1)
    raise MoefxError(f"unknown dump format {format!r}; choose one of {FORMATS}")


# ---------------------------------------------------------------------------------------------
# layer table


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


def _parallel_of(gm: fx.GraphModule):
    """(ResolvedParallel, rank) of a partitioned graph, or (None, None)."""
    f = facts(gm)
    return (f.parallel, f.rank or 0) if f.parallel is not None else (None, None)


def experts_held(lp, rank: int, experts: torch.nn.Module | None = None) -> str:
    """What `rank` holds of one MoE layer: "experts 4-7 of 8", "expert 3 of 8", or with expert
    slicing "expert 2, slice 1/2" (0-based slice index / number of slices).

    lp: the layer's `moefx.parallel.LayerParallel`; experts: the rank's experts module, whose
    first_expert / num_experts (the tensors it really holds) win over what `lp` computes.
    """
    held = lp.experts_of(rank)
    first = getattr(experts, "first_expert", held.start)
    count = getattr(experts, "num_experts", len(held))
    if lp.expert_slicing > 1:
        return f"expert {first}, slice {lp.slice_of(rank)}/{lp.expert_slicing}"
    if count == 1:
        return f"expert {first} of {lp.experts}"
    return f"experts {first}-{first + count - 1} of {lp.experts}"


def _rank_header(resolved, rank: int) -> str:
    """The degrees of `rank` in one line: world, tp / dp (with the rank's index in each), ep / edp."""
    eps = ", ".join(str(lp.ep) for lp in resolved.layers) or "-"
    edps = ", ".join(str(lp.edp) for lp in resolved.layers) or "-"
    return (f"rank {rank} of {resolved.world} (node {resolved.node_of(rank)}, local {resolved.local_of(rank)}): "
            f"tp {resolved.tp} (tp rank {resolved.tp_rank(rank)}), dp {resolved.dp} (dp rank "
            f"{resolved.dp_rank(rank)}), ep {eps} / edp {edps} per MoE layer")


def experts_paths(gm: fx.GraphModule) -> dict[int, str]:
    """MoE layer -> how its experts run: "gather" (weights read per token) or "buffer" ([E, C, d])."""
    gathered = set(gather_layers(gm))
    return {layer: "gather" if layer in gathered else "buffer" for layer, _ in moe_layers(gm)}


def _moe_row(block: int, m: MoELayer, impl: str | None, path: str, dense_params: int) -> tuple:
    """The table row of one MoE layer (parameters as held by this graph: a rank's share when partitioned)."""
    expert_params = sum(p.numel() for p in m.experts.parameters())
    other = sum(p.numel() for p in m.parameters()) - expert_params + dense_params
    per_expert = expert_params // max(getattr(m.experts, "num_experts", m.num_experts), 1)
    kind = "PR-MoE" if m.coef is not None else "MoE"
    cap = "dropless" if not m.gate.drop_tokens else f"cf={m.gate.capacity_factor:g}"
    return (block, kind, m.num_experts, m.gate.top_k, cap, "yes" if m.coef is not None else "no",
            impl or m.gate.impl, path, human(expert_params + other), human(other + per_expert * m.gate.top_k))


def _format_table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def layer_table(gm: fx.GraphModule) -> str:
    """One row per block: dense FFN or (PR-)MoE layer, experts, top-k, residual, impl, experts path
    (buffer / gather), parameters.

    For a partitioned graph (`facts(gm).parallel` set) a header line gives the rank's tp /
    dp / ep degrees, and each MoE row adds its ep, edp and the experts this rank holds;
    parameters are then this rank's.
    """
    resolved, rank = _parallel_of(gm)
    impls = {n.meta.get(M.LAYER): n.meta.get(M.IMPL) for n in gm.graph.nodes if n.meta.get(M.ROLE) == "route"}
    moe_by_block = {m.block: (layer, m) for layer, m in moe_layers(gm)}
    lp_by_layer = {lp.layer: lp for lp in resolved.layers} if resolved is not None else {}
    dense = _block_ffn_params(gm)
    paths = experts_paths(gm)
    header = ("block", "ffn", "experts", "top_k", "capacity", "residual", "gating", "path", "ffn params",
              "active/token")
    if resolved is not None:
        header += ("ep", "edp", f"rank {rank} holds")
    rows = []
    for b in sorted(set(dense) | set(moe_by_block)):
        if b in moe_by_block:
            layer, m = moe_by_block[b]
            row = _moe_row(b, m, impls.get(layer), paths[layer], dense.get(b, 0))
            lp = lp_by_layer.get(layer)
            if resolved is not None:
                row += (lp.ep, lp.edp, experts_held(lp, rank, m.experts)) if lp else ("-", "-", "-")
        else:
            row = (b, "dense", "-", "-", "-", "-", "-", "-", human(dense[b]), human(dense[b]))
            if resolved is not None:
                row += ("-", "-", "-")
        rows.append(row)
    out = [_rank_header(resolved, rank)] if resolved is not None else []
    out += _format_table(header, rows)
    counts = count_params(gm)
    out.append(f"\nparameters{' on this rank' if resolved is not None else ''}: {counts}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# JSON


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
                              ("impl", M.IMPL), ("group", M.GROUP), ("experts_path", M.PATH)):
            if meta_key in n.meta:
                entry[key] = n.meta[meta_key]
        shape = _shape(n)
        if shape is not None:
            entry["shape"] = shape
        nodes.append(entry)
    paths = experts_paths(gm)
    layers = [{"name": f"moe{layer}", "block": m.block, "experts": m.num_experts, "top_k": m.gate.top_k,
               "experts_path": paths[layer],
               "residual": m.coef is not None, "drop_tokens": m.gate.drop_tokens,
               "capacity_factor": m.gate.capacity_factor, "impl": m.gate.impl,
               "expert_params": sum(p.numel() for p in m.experts.parameters())} for layer, m in moe_layers(gm)]
    c = count_params(gm)
    return {"passes": list(facts(gm).passes), "nodes": nodes, "moe_layers": layers,
            "params": {"total": c.total, "active": c.active, "expert": c.expert}}


# ---------------------------------------------------------------------------------------------
# DOT


def shape_text(n: fx.Node) -> tuple[str, str] | None:
    """(example shape, symbolic shape) of a node whose meta "val" is a tensor, e.g.
    ("[2, 8, 32]", "[s72, s70, 32]"); None otherwise. A symbolic size prints as the size of the
    example it was captured with, or as its expression when it has none."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return None
    example = [_size_hint(s) for s in v.shape]
    return f"[{', '.join(example)}]", f"[{', '.join(str(s) for s in v.shape)}]"


def _size_hint(s) -> str:
    if isinstance(s, torch.SymInt):
        hint = getattr(s.node, "hint", None)
        return str(hint) if hint is not None else str(s)
    return str(s)


def _is_noise(n: fx.Node) -> bool:
    name = _target_name(n)
    return "_assert_tensor_metadata" in name or "sym_size" in name or n.target == "_guards_fn"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _shown(gm: fx.GraphModule) -> list[fx.Node]:
    """The compute nodes a picture shows (parameters and shape-check noise left out)."""
    return [n for n in gm.graph.nodes if n.op != "get_attr" and not _is_noise(n)]


def block_of_nodes(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The Transformer block of every node that has one: node.meta["moefx_block"] where a pass or
    the analysis set it, else the block `moefx.find_blocks` puts it in (attention, norms, the
    residual adds). Nodes outside every block (embeddings, masks, head) are left out."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out: dict[fx.Node, int] = {}
    try:
        for b in find_blocks(gm):
            for name in b.nodes:
                if name in by_name:
                    out[by_name[name]] = b.index
    except MoefxError:  # no shape metadata, a branching stream: draw with the tagged blocks only
        pass
    for n in gm.graph.nodes:
        if M.BLOCK in n.meta:
            out[n] = n.meta[M.BLOCK]
    return out


def moe_blocks(gm: fx.GraphModule) -> dict[int, tuple[int, int | str]]:
    """{block: (MoE layer L, experts of moe{L})} for the MoE blocks of `gm` (read from the nodes'
    moefx_block / moefx_layer; the expert count is the layer's, over all ranks)."""
    out = {}
    for n in gm.graph.nodes:
        if M.BLOCK in n.meta and M.LAYER in n.meta and n.meta[M.BLOCK] not in out:
            layer = n.meta[M.LAYER]
            try:
                experts = gm.get_submodule(f"moe{layer}").num_experts
            except AttributeError:
                experts = "?"
            out[n.meta[M.BLOCK]] = (layer, experts)
    return out


def _is_moe_node(n: fx.Node) -> bool:
    """A node an MoE pass created or tagged as part of an MoE layer's computation."""
    return M.BLOCK in n.meta and n.meta.get(M.ROLE) in MOE_VISIBLE_ROLES


@dataclass
class _Summary:
    """One collapsed group: its DOT id, title, block (None: prologue / epilogue) and members."""

    id: str
    title: str
    block: int | None
    members: list[fx.Node] = field(default_factory=list)


def _group_key(n: fx.Node, pos: int, block: int | None, span: tuple[int, int],
               moe_span: dict[int, tuple[int, int]]) -> tuple[str, str, int | None] | None:
    """(id, title, block) of the summary node `n` collapses into, or None when it stays visible.

    span: graph positions of the first and last node in any block; moe_span: the same for the
    visible nodes of each MoE block (its dense nodes before them and after them collapse apart,
    so no summary node sits on both sides of the MoE layer)."""
    if n.op in ("placeholder", "output"):
        return None
    if block is None:
        if pos < span[0]:
            return "prologue", "prologue", None
        if pos > span[1]:
            return "epilogue", "epilogue", None
        return None
    if block not in moe_span:
        return f"block{block}_ops", f"block {block}", block
    if _is_moe_node(n):
        return None
    first, last = moe_span[block]
    if pos < first:
        return f"block{block}_pre", f"block {block}: before the MoE layer", block
    if pos > last:
        return f"block{block}_post", f"block {block}: after the MoE layer", block
    return None


def collapse(shown: list[fx.Node], block_of: dict[fx.Node, int], moe: dict[int, tuple]) -> dict[fx.Node, _Summary]:
    """The summary node of every node of `shown` that a collapsed view hides (graph order kept).
    Groups of a single node stay visible; nothing collapses when no block was found."""
    pos = {n: i for i, n in enumerate(shown)}
    blocked = [pos[n] for n in shown if n in block_of]
    if not blocked:
        return {}
    span = (min(blocked), max(blocked))
    moe_span: dict[int, tuple[int, int]] = {}
    for n in shown:
        b = block_of.get(n)
        if b in moe and _is_moe_node(n):
            lo, hi = moe_span.get(b, (pos[n], pos[n]))
            moe_span[b] = (min(lo, pos[n]), max(hi, pos[n]))
    near = _nearest_blocks(shown, block_of)
    groups: dict[str, _Summary] = {}
    for n in shown:
        key = _group_key(n, pos[n], near.get(n), span, moe_span)
        if key is not None:
            groups.setdefault(key[0], _Summary(*key)).members.append(n)
    return {m: g for g in groups.values() if len(g.members) > 1 for m in g.members}


def _nearest_blocks(shown: list[fx.Node], block_of: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """`block_of`, plus for every node outside the blocks that sits between two block nodes (a cast
    between blocks, LLaMA's rotary unsqueezes) the block of the next block node in graph order, the
    one that reads it; a collapsed view hides them in that block's summary."""
    out = dict(block_of)
    first = next((i for i, n in enumerate(shown) if n in block_of), len(shown))
    following = None
    for n in reversed(shown[first:]):
        if n in block_of:
            following = block_of[n]
        elif following is not None:
            out[n] = following
    return out


def _op_kind(n: fx.Node) -> str | None:
    if n.meta.get(M.ROLE) == "collective":
        return "collective"
    base = _target_name(n).split(".")[0]
    for kind, names in _OP_KINDS.items():
        if base in names:
            return kind
    return None


def summary_label(s: _Summary) -> str:
    """A summary node's text: its title, how many ops it holds and how many of them are matmuls,
    attentions, norms or collectives."""
    kinds = Counter(k for k in map(_op_kind, s.members) if k is not None)
    detail = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items(), key=lambda kc: -kc[1]))
    text = f"{s.title}\n{len(s.members)} ops (collapsed)"
    return text + (f"\n{detail}" if detail else "")


def node_label(n: fx.Node) -> str:
    """A visible node's text: name, op, example shape, gating impl "[torch]", group "<ep4>"."""
    lines = [n.name, _target_name(n)]
    shape = shape_text(n)
    if shape is not None:
        lines.append(shape[0])
    if M.IMPL in n.meta:
        lines.append(f"[{n.meta[M.IMPL]}]")
    if M.GROUP in n.meta:
        lines.append(f"<{n.meta[M.GROUP]}>")
    return "\n".join(lines)


def _node_tooltip(n: fx.Node) -> str:
    parts = [f"{k}={n.meta[key]}" for k, key in (("role", M.ROLE), ("pass", M.PASS), ("layer", M.LAYER))
             if key in n.meta]
    shape = shape_text(n)
    if shape is not None:
        parts.append(f"shape {shape[1]}")
    return " ".join(parts) or n.op


def _dot_node(node_id: str, label: str, fill: str, tooltip: str, extra: str = "") -> str:
    text = _esc(label).replace("\n", "\\n")
    return f'  {node_id} [label="{text}", fillcolor="{fill}", tooltip="{_esc(tooltip)}"{extra}];'


def cluster_label(block: int, moe: dict[int, tuple[int, int]], gm: fx.GraphModule) -> str:
    """ "block i", or "block i · MoE layer L (E experts)" (+ what this rank holds when partitioned)."""
    if block not in moe:
        return f"block {block}"
    layer, experts = moe[block]
    label = f"block {block} · MoE layer {layer} ({experts} experts)"
    resolved, rank = _parallel_of(gm)
    lp = {lp.layer: lp for lp in resolved.layers}.get(layer) if resolved is not None else None
    if lp is not None:
        experts_module = getattr(gm.get_submodule(f"moe{layer}"), "experts", None)
        label += f"\nrank {rank}: {experts_held(lp, rank, experts_module)}, ep {lp.ep}"
    return label


def legend_node() -> list[str]:
    """A cluster with one table node giving the fill colour of every role."""
    cells = "".join(f'<td bgcolor="{_ROLE_COLORS[role]}">{text}</td>' for text, role in _LEGEND)
    cells += '<td style="dashed">collapsed ops</td>'
    table = (f'<<table border="0" cellborder="1" cellspacing="0" cellpadding="3"><tr>{cells}</tr></table>>')
    return ["  subgraph cluster_legend {", '    label="legend"; color="#9ca3af"; fontsize=10;',
            f"    legend [shape=plaintext, style=\"\", label={table}];", "  }"]


def to_dot(gm: fx.GraphModule, expand: bool = False) -> str:
    """Graphviz DOT of `gm`: a legend of the role colours, one cluster per Transformer block
    ("block i", MoE ones "block i · MoE layer L (E experts)"), example tensor shapes on the nodes.

    Collapsed (default): dense blocks, the dense part of MoE blocks and the nodes before / after
    the blocks are one summary node each; MoE nodes stay visible, coloured by role, and edges
    join the visible nodes (a summary node stands for its members). expand=True: every compute
    node (parameters and shape checks are never drawn).
    """
    shown = _shown(gm)
    block_of = block_of_nodes(gm)
    moe = moe_blocks(gm)
    hidden = {} if expand else collapse(shown, block_of, moe)
    ids = {n: f"n{i}" for i, n in enumerate(shown)}
    rep = {n: hidden[n].id if n in hidden else ids[n] for n in shown}
    # newrank: rank the clusters with the whole graph; the old ranking lays them out apart and can
    # put chained blocks side by side (a 24-block model came out 4,400 pt wide).
    lines = ["digraph moefx {", "  rankdir=TB; newrank=true; ranksep=0.25; nodesep=0.2;",
             '  graph [fontname="Helvetica", fontsize=11];',
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=9, '
             'margin="0.08,0.03", height=0.3];', '  edge [arrowsize=0.6];']
    lines += legend_node()
    clusters: dict[int, list[str]] = {}
    for decl, block in _declarations(shown, hidden, ids, block_of):
        (clusters.setdefault(block, []) if block is not None else lines).append(decl)
    for b, decls in sorted(clusters.items()):
        label = _esc(cluster_label(b, moe, gm)).replace("\n", "\\n")
        lines += [f"  subgraph cluster_block{b} {{", f'    label="{label}"; color="#9ca3af";',
                  *("  " + d for d in decls), "  }"]
    lines += [f"  {a} -> {b};" for a, b in _edges(shown, rep)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _declarations(shown, hidden, ids, block_of):
    """(DOT node statement, block or None) of every visible node and every summary node, graph order."""
    done = set()
    for n in shown:
        s = hidden.get(n)
        if s is None:
            fill = _ROLE_COLORS.get(n.meta.get(M.ROLE), "white")
            yield _dot_node(ids[n], node_label(n), fill, _node_tooltip(n)), block_of.get(n)
        elif s.id not in done:
            done.add(s.id)
            tip = f"{len(s.members)} ops, --expand shows them"
            yield _dot_node(s.id, summary_label(s), _SUMMARY_COLOR, tip, ', style="rounded,dashed"'), s.block


def _edges(shown: list[fx.Node], rep: dict[fx.Node, str]) -> list[tuple[str, str]]:
    """Edges between drawn nodes, once each (inside one summary node they vanish)."""
    out: dict[tuple[str, str], None] = {}
    for n in shown:
        for a in n.all_input_nodes:
            if a in rep and rep[a] != rep[n]:
                out[(rep[a], rep[n])] = None
    return list(out)


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
