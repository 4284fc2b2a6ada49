"""Graph pictures (legend, shapes, block clusters, collapsed size) and the per-rank layer table."""
import os
import re
import shutil
import functools

import pytest

import moefx
from moefx import meta as M
from moefx.cli import main
from moefx.dump import MOE_VISIBLE_ROLES, dump, to_dot
from moefx.models import load_model
from moefx.nn.moe import moe_layers
from moefx.parallel import validate_parallel

PLAN = "examples/plans/tiny_pr_moe.toml"
TP_EP = {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 2}
NODE_DECL = re.compile(r"^\s+(\w+) \[label=\"((?:[^\"\\]|\\.)*)\"", re.M)
EDGE = re.compile(r"^\s+(\w+) -> (\w+);", re.M)


@functools.lru_cache(maxsize=None)
def _converted(name):
    model, inputs = load_model(name)
    return moefx.convert(model, moefx.Plan.default(), inputs)


@pytest.fixture
def gpt2():
    return _converted("gpt2-tiny")


def _nodes(dot):
    """{DOT id: label} of the drawn graph nodes (the legend node left out)."""
    return {i: label for i, label in NODE_DECL.findall(dot) if i != "legend"}


def _compute_nodes(gm):
    return [n for n in gm.graph.nodes if n.op != "get_attr" and "sym_size" not in str(n.target)
            and "_assert_tensor_metadata" not in str(n.target)]


def _cluster_labels(dot):
    return dict(re.findall(r"subgraph cluster_block(\d+) \{\s*label=\"((?:[^\"\\]|\\.)*)\"", dot))


def test_dot_has_a_legend_of_every_role_and_example_shapes(gpt2):
    dot = dump(gpt2, "dot")
    assert "subgraph cluster_legend" in dot
    legend = next(line for line in dot.splitlines() if line.strip().startswith("legend ["))
    for role in ("router", "route", "dispatch", "experts", "combine", "coef / mix", "residual", "collective",
                 "layout", "aux"):
        assert f">{role}</td>" in legend
    assert "[2, 8, 32]" in dot  # batch 2, sequence 8, width 32 of the example inputs
    assert "[s" not in "".join(_nodes(dot).values())  # symbolic sizes print as the example's
    assert "tooltip=" in dot and "shape [s" in dot  # ... and as symbols in the tooltip


def test_one_cluster_per_block_moe_ones_named_with_layer_and_experts(gpt2):
    labels = _cluster_labels(dump(gpt2, "dot"))
    blocks = moefx.find_blocks(gpt2)
    assert sorted(map(int, labels)) == [b.index for b in blocks] and len(labels) == 4
    moe = {m.block: (layer, gpt2.get_submodule(f"moe{layer}").num_experts) for layer, m in moe_layers(gpt2)}
    assert len(moe) == 2
    for b, label in labels.items():
        b = int(b)
        if b in moe:
            layer, experts = moe[b]
            assert label == f"block {b} · MoE layer {layer} ({experts} experts)"
        else:
            assert label == f"block {b}"


def test_collapsed_view_keeps_moe_nodes_and_hides_dense_ones(gpt2):
    collapsed, expanded = _nodes(dump(gpt2, "dot")), _nodes(dump(gpt2, "dot", expand=True))
    assert len(collapsed) * 3 < len(expanded)
    names = {label.split("\\n")[0] for label in collapsed.values()}
    for n in gpt2.graph.nodes:
        if M.BLOCK in n.meta and n.meta.get(M.ROLE) in MOE_VISIBLE_ROLES:
            assert n.name in names
        if n.meta.get(M.ROLE) == "ffn" or n.target == "scaled_dot_product_attention":
            assert n.name not in names
    summaries = [label for label in collapsed.values() if "(collapsed)" in label]
    moe_blocks = {m.block for _, m in moe_layers(gpt2)}
    for b in {b.index for b in moefx.find_blocks(gpt2)} - moe_blocks:
        assert sum(s.startswith(f"block {b}\\n") for s in summaries) == 1  # a dense block: one summary
    assert any(s.startswith("prologue") for s in summaries) and any(s.startswith("epilogue") for s in summaries)


def test_expand_shows_every_compute_node(gpt2):
    dot = to_dot(gpt2, expand=True)
    names = [label.split("\\n")[0] for label in _nodes(dot).values()]
    assert sorted(names) == sorted(n.name for n in _compute_nodes(gpt2))
    assert "(collapsed)" not in dot
    assert dump(gpt2, "dot") == to_dot(gpt2)  # positional format, collapsed by default


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_edges_join_drawn_nodes_without_cycles(name):
    dot = to_dot(_converted(name))
    drawn = set(_nodes(dot))
    edges = EDGE.findall(dot)
    assert edges and all(a in drawn and b in drawn for a, b in edges)
    assert not _has_cycle(drawn, edges)


def _has_cycle(nodes, edges):
    succ = {n: [] for n in nodes}
    for a, b in edges:
        succ[a].append(b)
    state = dict.fromkeys(nodes, 0)

    def visit(n):
        state[n] = 1
        for m in succ[n]:
            if state[m] == 1 or (state[m] == 0 and visit(m)):
                return True
        state[n] = 2
        return False

    return any(state[n] == 0 and visit(n) for n in nodes)


def _svg_size_px(svg: bytes) -> tuple[float, float]:
    """(width, height) of an SVG's root tag in CSS px (Graphviz writes pt: 1 pt = 4/3 px)."""
    m = re.search(rb'<svg width="([\d.]+)(pt|px)?" height="([\d.]+)(pt|px)?"', svg)
    scale = 4 / 3 if m.group(2) in (b"pt", None) else 1.0
    return float(m.group(1)) * scale, float(m.group(3)) * scale


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_collapsed_svg_fits_a_browser(name):
    gm = _converted(name)
    collapsed = _svg_size_px(dump(gm, "svg"))
    expanded = _svg_size_px(dump(gm, "svg", expand=True))
    assert max(collapsed) < 4000, collapsed
    assert max(expanded) > 2 * max(collapsed), (collapsed, expanded)


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
def test_cli_svg_collapsed_and_expanded(tmp_path):
    small, big = tmp_path / "small.svg", tmp_path / "big.svg"
    assert main(["dump", "gpt2-tiny", "--plan", PLAN, "--format", "svg", "-o", str(small)]) == 0
    assert main(["dump", "gpt2-tiny", "--plan", PLAN, "--format", "svg", "--expand", "-o", str(big)]) == 0
    w, h = _svg_size_px(small.read_bytes())
    assert max(w, h) < 4000
    assert max(_svg_size_px(big.read_bytes())) > 2 * max(w, h)


def _parallel_plan(**parallel):
    d = moefx.Plan.default().to_dict()
    d["parallel"] = parallel
    return moefx.Plan.from_dict(d)


def _row(table, block):
    return next(line for line in table.splitlines() if line.split()[:1] == [str(block)])


def _expected_held(lp, rank):
    held = lp.experts_of(rank)
    if lp.expert_slicing > 1:
        return f"expert {held.start}, slice {lp.slice_of(rank)}/{lp.expert_slicing}"
    if len(held) == 1:
        return f"expert {held.start} of {lp.experts}"
    return f"experts {held.start}-{held.stop - 1} of {lp.experts}"


@pytest.mark.parametrize("parallel", [TP_EP, {"nodes": 2, "devices_per_node": 4, "ep": 8}],
                         ids=["tp2-ep2", "ep8-slicing"])
def test_partitioned_table_shows_each_ranks_experts_and_degrees(gpt2, parallel):
    plan = _parallel_plan(**parallel)
    layers = moe_layers(gpt2)
    world = parallel["nodes"] * parallel["devices_per_node"]
    resolved = validate_parallel(plan.parallel, world, [m.num_experts for _, m in layers])
    seen = set()
    for rank in range(4):
        table = dump(moefx.partitioned_view(gpt2, plan, rank=rank), "table")
        head = table.splitlines()[0]
        assert head.startswith(f"rank {rank} of {world}")
        assert f"tp {resolved.tp} (tp rank {resolved.tp_rank(rank)})" in head
        assert f"dp {resolved.dp} (dp rank {resolved.dp_rank(rank)})" in head
        assert "ep " + ", ".join(str(lp.ep) for lp in resolved.layers) in head
        for (layer, m), lp in zip(layers, resolved.layers):
            row = _row(table, m.block)
            assert row.endswith(_expected_held(lp, rank)), (rank, row)
            assert f"  {lp.ep}  " in row
            seen.add((layer, _expected_held(lp, rank)))
    assert len(seen) > len(layers)  # the ranks hold different experts


def test_partitioned_table_from_the_cli(tmp_path, capsys):
    plan = tmp_path / "p.toml"
    plan.write_text(open(PLAN).read() + "\n[parallel]\n" + "".join(f"{k} = {v}\n" for k, v in TP_EP.items()))
    assert main(["dump", "gpt2-tiny", "--plan", str(plan), "--stage", "partitioned", "--rank", "3",
                 "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "rank 3 of 4" in out and "experts 2-3 of 4" in out and "experts 4-7 of 8" in out


def test_unpartitioned_table_keeps_its_columns(gpt2):
    table = dump(gpt2, "table")
    assert table.splitlines()[0].split() == ["block", "ffn", "experts", "top_k", "capacity", "residual", "gating",
                                             "path", "ffn", "params", "active/token"]
    assert "holds" not in table and "rank" not in table


def test_output_file_keeps_the_umask(tmp_path):
    path = tmp_path / "table.txt"
    old = os.umask(0o022)
    try:
        assert main(["dump", "gpt2-tiny", "--format", "table", "-o", str(path)]) == 0
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
