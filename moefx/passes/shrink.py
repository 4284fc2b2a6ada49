"""Shrink (Mixture-of-Students): drop whole Transformer blocks from a teacher graph.

Runs after pr_moe and before lower_gating (stage "convert", when the plan has a [student]
section); it also runs on a dense captured graph, and `moefx.shrink(teacher, plan)` runs it on
its own. Requires: blocks recognisable by `moefx.analysis.find_blocks`. Produces the student: the same graph with the removed blocks cut
out of the residual stream, i.e. every use of a removed block's output reads the block's input
instead (consecutive removed blocks chain back to the first one's input), then

- the removed blocks' nodes are erased, with the side-effect nodes that only they fed (export's
  `aten._assert_tensor_metadata`, a removed MoE layer's aux-loss sink) which dead-code
  elimination alone would keep alive;
- unused submodules are deleted: a removed MoE layer's `moe{L}` (router, experts, coef, aux
  sink) disappears, so `moefx.aux_loss(student)` sums the kept layers only;
- every parameter and buffer is copied: training the student never changes the teacher.

Nothing is renumbered: kept nodes keep their `moefx_block` / `moefx_layer` tags, kept MoE layers
keep their submodule names (`moe1`, `moe3`, ...). `facts(student).student_keep` holds the
kept teacher block indices, `.block_origin` the original index of each block (a student of a
student still names the first teacher's blocks), `.num_blocks` the new count and
`.counters["shrink"]` how many blocks were removed.

Which blocks: `student.keep` lists teacher block indices (`find_blocks(teacher)[i].index`, graph
order: T5's encoder blocks come first), or `student.layers` / `student.depth` give a count and
`keep = "auto"` chooses (see `auto_keep`). A model with several stacks (T5: encoder + decoder)
splits the count over the stacks in proportion to their sizes (largest remainder, ties to the
deeper stack, at least one block each) and applies `auto_keep` to each stack.

    >>> student = shrink(teacher_gm, Plan.from_dict({"student": {"layers": 3}}))   # dense GPT-2, 4 blocks
    >>> facts(student).student_keep
    (0, 1, 3)
    >>> print(student.code)                # block 2 is gone: block 3 reads block 1's output add_11
    ...
    layer_norm_6 = torch.ops.aten.layer_norm.default(add_11, [32], transformer_h_3_ln_1_weight, ...)
    ...
    add_16 = torch.ops.aten.add.Tensor(dropout_7, add_11)

Does not handle: blocks the analysis does not find (see `moefx.analysis.blocks`), or models that
read a removed block's inner values elsewhere (the pass then raises PassError). Removing block 0
of a T5 stack keeps its relative-position-bias computation (later blocks read it), as it should.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import fx, nn

from ..analysis.blocks import Block, find_blocks, stacks
from ..errors import AnalysisError, PassError, PlanError
from ..facts import facts, record_facts
from ..nn.aux import AuxLossSink
from ..plan import Plan, StudentPlan
from .base import Pass, PassContext
from .conditions import BLOCKS
from .graph import copy_graph_module, drop_unused_attributes

NAME = "shrink"


def shrink(gm: fx.GraphModule, plan) -> fx.GraphModule:
    """The student of `gm`: its blocks that `plan.student` keeps, with copied weights.

    Takes a GraphModule from `moefx.capture` or `moefx.convert` and a Plan (or its dict form, or a
    StudentPlan). Returns a new GraphModule (always a new one, even when every block is kept).
    Raises PlanError when the plan does not fit the teacher, AnalysisError when no block is found.
    """
    student = _student_plan(plan)
    if not isinstance(gm, fx.GraphModule):
        raise AnalysisError(f"shrink takes a GraphModule, got {type(gm).__name__}: capture the model first "
                            "(moefx.capture(model, inputs) or moefx.convert(model, plan, inputs))")
    blocks = find_blocks(gm)
    if not blocks:
        raise AnalysisError("shrink found no Transformer block (residual add after an FFN) in the graph; "
                            "moefx.analysis.find_blocks(gm) shows what the analysis sees")
    keep = select_blocks(blocks, student)
    removed = [b for b in blocks if b.index not in keep]

    new = copy_graph_module(gm)
    graph = new.graph
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live_before = _ancestors(output)
    for b in sorted(removed, key=lambda b: b.index, reverse=True):
        by_name[b.output].replace_all_uses_with(by_name[b.input])
    _erase_unreachable(graph, live_before, _ancestors(output))
    graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    drop_unused_attributes(new)
    _copy_weights(new)
    _check_removed(new, removed)

    old_origin = [b.origin for b in blocks]
    record_facts(new, student_keep=tuple(keep), block_origin=tuple(old_origin[i] for i in keep),
                 num_blocks=len(keep), counters={**facts(new).counters, NAME: len(removed)})
    new.recompile()
    graph.lint()
    return new


class Shrink(Pass):
    """The shrink pass of the pipeline (see the module docstring); `moefx.shrink` is its function form."""

    name = NAME
    stage = "convert"
    requires = (BLOCKS,)

    def applies(self, ctx: PassContext) -> bool:
        return ctx.plan.student is not None

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return shrink(gm, ctx.plan.student)

    def ensures(self, before, after, ctx) -> None:
        want = len(select_blocks(find_blocks(before), _student_plan(ctx.plan)))
        if len(find_blocks(after)) != want:
            raise AssertionError(f"the student should keep {want} blocks but its graph has {len(find_blocks(after))}")


SHRINK = Shrink()


# --------------------------------------------------------------------------------------------
# Which blocks to keep
# --------------------------------------------------------------------------------------------


def select_blocks(blocks: list[Block], student: StudentPlan) -> tuple[int, ...]:
    """The sorted indices of the blocks `student` keeps (validated; PlanError names the fix)."""
    total = len(blocks)
    groups = stacks(blocks)
    if isinstance(student.keep, tuple):
        return _explicit_keep(student, total, groups)
    if student.layers is not None and student.layers > total:
        raise PlanError(f"student.layers = {student.layers} exceeds the teacher's {total} blocks: "
                        f"use layers <= {total} (or depth <= 1)")
    n = student.num_layers(total)
    if n < len(groups):
        raise PlanError(f"a student of {n} block(s) cannot keep one block in each of the teacher's {len(groups)} "
                        f"stacks (encoder and decoder): use layers >= {len(groups)}")
    keep: list[int] = []
    for group, count in zip(groups, apportion(n, [len(g) for g in groups])):
        chosen = auto_keep([b.num_experts for b in group], count)
        keep += [group[i].index for i in chosen]
    return tuple(sorted(keep))


def _explicit_keep(student: StudentPlan, total: int, groups: list[list[Block]]) -> tuple[int, ...]:
    keep = student.keep
    if not keep:
        raise PlanError("student.keep is empty: list the teacher blocks the student keeps (0-based), "
                        "or use keep = 'auto' with layers / depth")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise PlanError(f"student.keep has block index(es) {bad} but the teacher has {total} blocks: "
                        f"use indices 0..{total - 1} (moefx.analysis.find_blocks(gm) lists them)")
    dups = sorted({i for i in keep if keep.count(i) > 1})
    if dups:
        raise PlanError(f"student.keep lists block(s) {dups} more than once: list each kept block once")
    if student.layers is not None or student.depth is not None:
        n = student.num_layers(total)
        if n != len(keep):
            raise PlanError(f"student.keep lists {len(keep)} blocks but student.layers/depth asks for {n}: "
                            "drop layers/depth or make them agree")
    for s, group in enumerate(groups):
        if not any(b.index in keep for b in group):
            raise PlanError(f"student.keep removes every block of stack {s} (blocks {[b.index for b in group]}); "
                            "keep at least one block of each stack (T5: encoder and decoder)")
    return tuple(sorted(keep))


def apportion(n: int, sizes: list[int]) -> list[int]:
    """Split `n` kept blocks over stacks of `sizes` in proportion (largest remainder, at least 1 and
    at most the size each; ties go to the later, deeper stack)."""
    total = sum(sizes)
    quotas = [n * s / total for s in sizes]
    counts = [min(s, max(1, math.floor(q))) for s, q in zip(sizes, quotas)]
    while sum(counts) > n:  # the minimum of 1 overshot: take from the stack furthest above its quota
        i = max((i for i in range(len(sizes)) if counts[i] > 1), key=lambda i: (counts[i] - quotas[i], i))
        counts[i] -= 1
    while sum(counts) < n:
        i = max((i for i in range(len(sizes)) if counts[i] < sizes[i]), key=lambda i: (quotas[i] - counts[i], i))
        counts[i] += 1
    return counts


def auto_keep(experts: list[int | None], n: int) -> list[int]:
    """Which `n` of a stack's blocks a student keeps; `experts[i]` is block i's expert count (None: dense).

    The rule, for a stack of B blocks of which M are MoE layers:
    1. Keep the first and the last block (one block: the last). The first reads the embeddings
       (and in T5 computes the relative position bias every later block reads); the last feeds the
       final norm and head, and in a PR-MoE model is the deepest, largest-expert MoE layer.
    2. Keep floor(n * M / B) MoE layers: the MoE share of the teacher, rounded down. With MoE in
       every other block this is exactly the MoE layout a PR-MoE of n layers has (DeepSpeed puts
       MoE in 1-based layers 2, 4, ...: floor(n / 2) of them).
    3. Remove MoE layers from the bottom of the pyramid (fewest experts) upward, evenly spaced
       inside a level: experts help most in deep layers (PR-MoE's observation 1), so the
       largest-expert top of the pyramid stays whole.
    4. Remove dense blocks evenly spaced among the removable ones.

    This reproduces the paper's student: 24 blocks, MoE in blocks 1, 3, ..., 23 with 32 experts x 10
    then 64 x 2, keeping 21 removes blocks 5, 15 (32-expert MoE) and 12 (dense): MoE layers
    32 x 8 + 64 x 2, as in DeepSpeed-MoE's MoS (24 -> 21 layers).
    """
    total = len(experts)
    if not 1 <= n <= total:
        raise PlanError(f"cannot keep {n} of {total} blocks")
    if n == total:
        return list(range(total))
    forced = {0, total - 1} if n >= 2 else {total - 1}
    moe = [i for i, e in enumerate(experts) if e is not None]
    dense = [i for i, e in enumerate(experts) if e is None]
    forced_moe = len(forced & set(moe))
    forced_dense = len(forced) - forced_moe
    lo = max(forced_moe, n - len(dense))
    hi = min(len(moe), n - forced_dense)
    keep_moe = min(max(n * len(moe) // total, lo), hi)
    remove: set[int] = set()
    drop_moe = len(moe) - keep_moe
    for level in sorted({experts[i] for i in moe}):
        if drop_moe == 0:
            break
        candidates = [i for i in moe if experts[i] == level and i not in forced]
        chosen = _evenly(candidates, min(drop_moe, len(candidates)))
        remove |= set(chosen)
        drop_moe -= len(chosen)
    candidates = [i for i in dense if i not in forced]
    remove |= set(_evenly(candidates, len(dense) - (n - keep_moe)))
    return [i for i in range(total) if i not in remove]


def _evenly(candidates: list[int], r: int) -> list[int]:
    """`r` of `candidates`, evenly spaced: the one in the middle of each of r equal slices."""
    m = len(candidates)
    return [candidates[math.floor((i + 0.5) * m / r)] for i in range(r)] if r > 0 else []


def _student_plan(plan) -> StudentPlan:
    if isinstance(plan, StudentPlan):
        return plan
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    student = getattr(plan, "student", None)
    if student is None:
        raise PlanError("shrink needs a plan with a [student] section, e.g. {'student': {'layers': 21}}")
    return student


# --------------------------------------------------------------------------------------------
# Graph surgery
# --------------------------------------------------------------------------------------------


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _erase_unreachable(graph: fx.Graph, live_before: set, live_after: set) -> None:
    """Erase what fed the output only through removed blocks, and everything computed from it
    (side-effect nodes included: asserts on removed values, removed MoE layers' aux sinks)."""
    doomed = live_before - live_after
    tainted: list[fx.Node] = []
    for n in graph.nodes:
        if n.op != "output" and (n in doomed or any(a in doomed for a in n.all_input_nodes)):
            doomed.add(n)
            tainted.append(n)
    for n in reversed(tainted):
        if n.users:
            raise PassError(f"shrink: {n.name} feeds {[u.name for u in n.users]} after the removed blocks were cut out")
        graph.erase_node(n)


def _check_removed(gm: fx.GraphModule, removed: list[Block]) -> None:
    """Post-condition: no residual add of a removed block is left."""
    names = {n.name for n in gm.graph.nodes}
    for b in removed:
        left = [a for a in b.residual_adds if a in names]
        if left:
            raise PassError(f"shrink: block {b.index} was removed but its residual add(s) {left} are still used "
                            "(the model reads the block's inner values elsewhere, e.g. per-layer hidden states)")


def _copy_weights(gm: fx.GraphModule) -> None:
    """Give `gm` its own copy of every parameter and buffer (ties between them kept) and of every
    module holding one, so training the student leaves the teacher untouched."""
    memo: dict[int, object] = {}
    for name, child in list(gm._modules.items()):
        if child is not None:
            gm._modules[name] = _clone_module(child, memo)
    for name, p in list(gm._parameters.items()):
        gm._parameters[name] = _clone_tensor(p, memo)
    for name, b in list(gm._buffers.items()):
        gm._buffers[name] = _clone_tensor(b, memo)


def _clone_module(m: nn.Module, memo: dict) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    new = copy.copy(m)
    memo[id(m)] = new
    new.__dict__.update({k: v.copy() for k, v in m.__dict__.items() if "hook" in k and isinstance(v, dict)})
    new._parameters = {k: _clone_tensor(p, memo) for k, p in m._parameters.items()}
    new._buffers = {k: _clone_tensor(b, memo) for k, b in m._buffers.items()}
    new._modules = {k: (_clone_module(c, memo) if c is not None else None) for k, c in m._modules.items()}
    if isinstance(new, AuxLossSink):
        new.value, new.ran = None, False
    return new


def _clone_tensor(t, memo: dict):
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    with torch.no_grad():
        out = t.detach().clone()
    if isinstance(t, nn.Parameter):
        out = nn.Parameter(out, requires_grad=t.requires_grad)
    memo[id(t)] = out
    return out
