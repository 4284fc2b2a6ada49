"""Shrink (MoS): structure of the student, numerics against eager models with blocks skipped,
the auto-keep rule, weight independence, aux-loss sinks, plan errors."""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import moefx
from moefx.facts import facts
from moefx import meta as M
from moefx.analysis.blocks import find_blocks
from moefx.errors import AnalysisError, PlanError
from moefx.models import load_model
from moefx.nn.aux import AuxLossSink
from moefx.nn.moe import MoELayer
from moefx.passes.shrink import SHRINK, apportion, auto_keep, shrink

from conftest import first_tensor

PR_MOE = {"moe": {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}}
TOP1 = {"moe": {"experts": 4, "every": 2, "top_k": 1, "residual": False, "drop_tokens": False}}
# Where the blocks' weights live, and how to build an eager model with only some of them.
LAYERS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers", "bert-tiny": "bert.encoder.layer",
          "t5-tiny": None}


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    model, inputs = load_model(name)
    return model, inputs, moefx.capture(model, inputs)


@functools.lru_cache(maxsize=None)
def _teacher(name: str, plan: str = "dense"):
    """(eager model, example inputs, teacher GraphModule): captured once per model."""
    model, inputs, gm = _captured(name)
    if plan != "dense":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = moefx.convert(gm, {"pr_moe": PR_MOE, "top1": TOP1}[plan])
    return model, inputs, gm


def _skip_blocks(model: nn.Module, path: str, keep) -> nn.Module:
    """The eager model with only the blocks `keep` (a deep copy; the config says how many)."""
    ref = copy.deepcopy(model)
    parent, attr = ref.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    ref.config.num_hidden_layers = len(keep)
    return ref


def _params(gm):
    return dict(gm.named_parameters(remove_duplicate=False))


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1.0)


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,plan", [("gpt2-tiny", "dense"), ("gpt2-tiny", "pr_moe"), ("gpt2-tiny", "top1"),
                                       ("llama-tiny", "dense"), ("llama-tiny", "pr_moe"), ("bert-tiny", "dense"),
                                       ("bert-tiny", "pr_moe"), ("t5-tiny", "dense")])
def test_student_structure_and_weights(name, plan):
    model, inputs, teacher = _teacher(name, plan)
    code = teacher.code
    student = shrink(teacher, {"student": {"layers": 3}})
    student.graph.lint()
    assert teacher.code == code  # the input is not mutated

    blocks = find_blocks(student)
    keep = facts(student).student_keep
    assert len(blocks) == 3 and len(keep) == 3
    assert [b.origin for b in blocks] == list(keep) == list(facts(student).block_origin)
    assert facts(student).counters["shrink"] == 1 and facts(student).num_blocks == 3
    expected = (1, 2, 3) if name == "t5-tiny" else (0, 2, 3) if plan != "dense" else (0, 1, 3)
    assert keep == expected
    if name == "t5-tiny":  # 3 of 2 + 2 blocks: one encoder block (its last), both decoder blocks
        assert [[b.origin for b in blocks if b.stack == s] for s in (0, 1)] == [[1], [2, 3]]

    # Kept blocks' weights equal the teacher's, as copies; removed blocks' weights are gone.
    t_params, s_params = _params(teacher), _params(student)
    for pname, p in s_params.items():
        assert pname in t_params, pname
        assert torch.equal(p, t_params[pname]) and p.data_ptr() != t_params[pname].data_ptr(), pname
    removed = set(range(4)) - set(keep)
    tb = find_blocks(teacher)
    for b in tb:
        # (T5's relative position bias lives in block 0 and every block reads it: it stays)
        mine = [p for p in t_params if b.module_path and p.startswith(b.module_path + ".")
                and "relative_attention_bias" not in p]
        assert mine, b.module_path
        assert all((p in s_params) == (b.index in keep) for p in mine), b.module_path
    # Tags are not renumbered: every node tagged with a block belongs to a kept one.
    tags = {n.meta[M.BLOCK] for n in student.graph.nodes if M.BLOCK in n.meta}
    assert tags <= set(keep) and not (tags & removed)
    moe_blocks = sorted(m.block for m in student.modules() if isinstance(m, MoELayer))
    assert moe_blocks == ([b for b in keep if b % 2 == 1] if plan != "dense" else [])

    with torch.no_grad():
        out, ref = first_tensor(student(*inputs)), first_tensor(teacher(*inputs))
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name,plan", [("gpt2-tiny", "dense"), ("gpt2-tiny", "pr_moe"), ("llama-tiny", "pr_moe"),
                                       ("bert-tiny", "dense"), ("t5-tiny", "dense")])
def test_keeping_every_block_computes_the_teacher(name, plan):
    _, inputs, teacher = _teacher(name, plan)
    student = shrink(teacher, {"student": {"depth": 1.0}})
    assert student is not teacher and facts(student).student_keep == (0, 1, 2, 3)
    assert facts(student).counters["shrink"] == 0
    with torch.no_grad():
        assert torch.equal(first_tensor(student(*inputs)), first_tensor(teacher(*inputs)))


# --------------------------------------------------------------------------------------------
# Numerics: the student is the eager model with the removed blocks skipped
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,plan,keep", [
    ("gpt2-tiny", "dense", "auto"), ("gpt2-tiny", "dense", (1, 2, 3)), ("gpt2-tiny", "dense", (0, 3)),
    ("gpt2-tiny", "pr_moe", "auto"), ("llama-tiny", "dense", (0, 2)), ("llama-tiny", "pr_moe", "auto"),
    ("bert-tiny", "dense", (0, 1, 2)), ("bert-tiny", "pr_moe", (1, 3)),
])
def test_student_matches_eager_model_with_blocks_skipped(name, plan, keep):
    """A PR-MoE teacher (upcycled, unit top-1, dropless) computes the dense function, so its student
    matches the dense eager model with the same blocks skipped."""
    model, inputs, teacher = _teacher(name, plan)
    student_plan = {"layers": 3} if keep == "auto" else {"keep": list(keep)}
    student = shrink(teacher, {"student": student_plan})
    kept = facts(student).student_keep
    if keep != "auto":
        assert kept == keep
    ref = _skip_blocks(model, LAYERS[name], kept).eval()
    _, other = load_model(name, batch=3, seq=5)
    with torch.no_grad():
        for x in (inputs, other):  # dynamic batch / sequence survive the pass
            out, want = first_tensor(student(*x)), first_tensor(ref(*x))
            assert out.shape == want.shape
            assert _close(out, want), (out - want).abs().max()


# --------------------------------------------------------------------------------------------
# MoE layers, aux loss, weight independence, pipeline
# --------------------------------------------------------------------------------------------


def test_removed_moe_layer_and_its_aux_sink_are_gone():
    _, inputs, teacher = _teacher("gpt2-tiny", "pr_moe")
    student = shrink(teacher, {"student": {"keep": [0, 2, 3]}})  # drops block 1 = moe0
    assert not hasattr(student, "moe0") and isinstance(student.moe1, MoELayer)
    assert [type(m) for m in student.modules()].count(AuxLossSink) == 1
    assert {n.meta.get(M.LAYER) for n in student.graph.nodes if M.LAYER in n.meta} == {1}
    assert not [n for n in student.graph.nodes if n.op == "call_module" and n.target.startswith("moe0")]
    roles = [n.meta.get(M.ROLE) for n in student.graph.nodes]
    assert roles.count("dispatch") == roles.count("combine") == roles.count("route") == 1
    student(*inputs)
    assert torch.allclose(moefx.aux_loss(student), student.moe1.aux.value)  # the sink holds coef * l_aux
    assert student.moe1.aux.value is not teacher.moe1.aux.value


def test_training_the_student_leaves_the_teacher_alone():
    _, inputs, teacher = _teacher("gpt2-tiny", "pr_moe")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = shrink(teacher, {"student": {"layers": 3}})
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in t_ptrs for p in student.parameters())
    assert student.moe1 is not teacher.moe1 and student.moe1.experts is not teacher.moe1.experts
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    (first_tensor(student(*inputs)).pow(2).mean() + moefx.aux_loss(student)).backward()
    opt.step()
    assert any(not torch.equal(p, teacher.get_parameter(n)) for n, p in student.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_convert_runs_shrink_between_pr_moe_and_lowering():
    _, inputs, dense = _teacher("llama-tiny")
    plan = {**PR_MOE, "student": {"layers": 3}}
    student = moefx.convert(dense, plan)
    assert facts(student).passes == ("pr_moe", "shrink", "lower_gating")
    assert facts(student).student_keep == (0, 2, 3)
    assert {n.meta[M.IMPL] for n in student.graph.nodes if M.IMPL in n.meta} == {"torch"}
    assert SHRINK.name == "shrink" and SHRINK in moefx.PIPELINE
    skipped = moefx.convert(dense, {**plan, "disable": ["shrink"]})
    assert len(find_blocks(skipped)) == 4 and len(find_blocks(student)) == 3
    with torch.no_grad():
        first_tensor(student(*inputs))


def test_student_of_a_student_names_the_first_teachers_blocks():
    _, inputs, teacher = _teacher("gpt2-tiny", "pr_moe")
    once = shrink(teacher, {"student": {"layers": 3}})
    twice = shrink(once, {"student": {"keep": [0, 2]}})
    assert facts(twice).student_keep == (0, 2)
    assert facts(twice).block_origin == (0, 3)
    assert [b.origin for b in find_blocks(twice)] == [0, 3]
    direct = shrink(teacher, {"student": {"keep": [0, 3]}})
    with torch.no_grad():
        assert torch.equal(first_tensor(twice(*inputs)), first_tensor(direct(*inputs)))


def test_t5_keeps_a_block_in_each_stack():
    _, inputs, teacher = _teacher("t5-tiny")
    student = shrink(teacher, {"student": {"layers": 2}})
    blocks = find_blocks(student)
    assert facts(student).student_keep == (1, 3)
    assert [(b.stack, b.origin) for b in blocks] == [(0, 1), (1, 3)]
    explicit = shrink(teacher, {"student": {"keep": [0, 2]}})
    assert [(b.stack, b.origin) for b in find_blocks(explicit)] == [(0, 0), (1, 2)]
    with torch.no_grad():
        outs = [student(*inputs), explicit(*inputs)]
    assert all(o.logits.shape == (2, 8, 128) for o in outs)


# --------------------------------------------------------------------------------------------
# The auto-keep rule
# --------------------------------------------------------------------------------------------


def test_auto_keep_reproduces_the_papers_student():
    """DeepSpeed-MoE's MoS: 24 -> 21 layers, MoE layers 32x10 + 64x2 -> 32x8 + 64x2."""
    experts = [None if i % 2 == 0 else (32 if i < 20 else 64) for i in range(24)]
    keep = auto_keep(experts, 21)
    assert len(keep) == 21 and keep[0] == 0 and keep[-1] == 23
    assert sorted(set(range(24)) - set(keep)) == [5, 12, 15]
    kept = [experts[i] for i in keep if experts[i] is not None]
    assert kept == [32] * 8 + [64] * 2


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("blocks", [1, 2, 4, 7, 12, 24])
def test_auto_keep_invariants(blocks, every):
    experts = [(4 if i < blocks // 2 else 8) if (i + 1) % every == 0 else None for i in range(blocks)]
    moe = sum(e is not None for e in experts)
    for n in range(1, blocks + 1):
        keep = auto_keep(experts, n)
        assert keep == sorted(set(keep)) and len(keep) == n
        assert keep[-1] == blocks - 1 and (n == 1 or keep[0] == 0)
        kept_moe = [experts[i] for i in keep if experts[i] is not None]
        dropped = [experts[i] for i in range(blocks) if i not in keep and experts[i] is not None]
        if 8 in dropped:  # the top of the pyramid goes last: every removable 4-expert layer went first
            assert all(i in (0, blocks - 1) for i in keep if experts[i] == 4)
        if every == 2 and blocks % 2 == 0 and n >= 2:  # MoE every other block: floor(n / 2) MoE layers
            assert len(kept_moe) == n // 2 == n * moe // blocks


def test_auto_keep_dense_is_evenly_spaced():
    assert auto_keep([None] * 4, 3) == [0, 1, 3]
    assert auto_keep([None] * 24, 21) == [i for i in range(24) if i not in (4, 12, 19)]
    assert auto_keep([None] * 12, 6) == [0, 2, 4, 7, 9, 11]


def test_apportion_over_stacks():
    assert apportion(3, [2, 2]) == [1, 2]
    assert apportion(2, [2, 2]) == [1, 1]
    assert apportion(4, [2, 2]) == [2, 2]
    assert apportion(9, [12, 6]) == [6, 3]
    assert apportion(2, [10, 1]) == [1, 1]
    assert sum(apportion(17, [12, 12])) == 17


# --------------------------------------------------------------------------------------------
# Plan errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,student,match", [
    ("gpt2-tiny", {"layers": 5}, r"layers = 5 exceeds the teacher's 4 blocks: use layers <= 4"),
    ("gpt2-tiny", {"keep": [0, 4]}, r"index\(es\) \[4\] .* use indices 0..3"),
    ("gpt2-tiny", {"keep": [-1, 2]}, r"student.keep\[0\] must be >= 0, got -1"),
    ("gpt2-tiny", {"keep": [0, 2, 2]}, r"\[2\] more than once"),
    ("gpt2-tiny", {"keep": [0, 2], "layers": 3}, r"lists 2 blocks but student.layers/depth asks for 3"),
    ("t5-tiny", {"keep": [2, 3]}, r"every block of stack 0 \(blocks \[0, 1\]\)"),
    ("t5-tiny", {"layers": 1}, r"one block in each of the teacher's 2 stacks .* layers >= 2"),
])
def test_bad_plans_name_the_fix(name, student, match):
    _, _, teacher = _teacher(name)
    with pytest.raises(PlanError, match=match):
        shrink(teacher, {"student": student})


def test_bad_inputs():
    model, _, teacher = _teacher("gpt2-tiny")
    with pytest.raises(PlanError, match="needs a plan with a \\[student\\] section"):
        shrink(teacher, {"moe": {"experts": 4}})
    with pytest.raises(AnalysisError, match="capture the model first"):
        shrink(model, {"student": {"layers": 2}})
    mlp = moefx.capture(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), (torch.randn(2, 8),))
    with pytest.raises(AnalysisError, match="no Transformer block"):
        shrink(mlp, {"student": {"layers": 1}})


@pytest.mark.slow
def test_papers_350m_pr_moe_student_on_the_meta_device():
    """GPT-2 medium shape (24 x 1024) + PR-MoE-32/64 -> MoS with 21 layers, no memory allocated:
    MoE layers 32x8 + 64x2, ~4.1B -> ~3.5B parameters (the paper: ~4B and ~3.5B)."""
    model, inputs = load_model("gpt2-medium-24", device="meta")
    plan = {"moe": {"experts": "32x10+64x2", "every": 2, "residual": True, "drop_tokens": False},
            "student": {"layers": 21}}
    student = moefx.convert(model, plan, inputs, copy_weights=False)
    assert sorted(set(range(24)) - set(facts(student).student_keep)) == [5, 12, 15]
    layers = sorted((m.block, m.num_experts) for m in student.modules() if isinstance(m, MoELayer))
    assert [e for _, e in layers] == [32] * 8 + [64] * 2 and layers[-1][0] == 23
    assert len(find_blocks(student)) == 21
    total = moefx.count_params(student).total
    assert 3.4e9 < total < 3.7e9, total
