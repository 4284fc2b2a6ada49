"""The pass pipeline, declared once.

    PIPELINE = pr_moe -> shrink -> lower_gating            stage "convert"    (moefx.convert)
               -> expert_parallel -> tensor_parallel
               -> hierarchical_a2a -> overlap_a2a          stage "distribute" (moefx.distribute)

`run(gm, ctx, stage)` runs the stage's passes that apply to the plan, in order, each checked
(`Pass.__call__`: requires, call, verify, ensures), recording their names in
`facts(gm).passes` and, when asked, writing the code after each one (`NNN_name.py`).
`check(plan)` decides statically, before any work, which passes run: a pass the plan switches
off (`plan.disable`) that a later pass needs is a PlanError naming both; a pass whose
requirement nothing will provide has nothing to do and is skipped (no MoE layers to lower).
"""
from __future__ import annotations

from pathlib import Path

from torch import fx

from ..errors import AnalysisError, MoefxError, PassError, PlanError
from ..facts import facts, record_facts
from ..fileio import write_atomic
from ..plan import PASS_NAMES
from .base import Pass, PassContext
from .expert_parallel import EXPERT_PARALLEL
from .hierarchical_a2a import HIERARCHICAL_A2A
from .lower_gating import LOWER_GATING
from .overlap_a2a import OVERLAP_A2A
from .pr_moe import PR_MOE
from .shrink import SHRINK
from .tensor_parallel import TENSOR_PARALLEL

PIPELINE: tuple[Pass, ...] = (PR_MOE, SHRINK, LOWER_GATING, EXPERT_PARALLEL, TENSOR_PARALLEL, HIERARCHICAL_A2A, OVERLAP_A2A)
STAGES = ("convert", "distribute")
assert tuple(p.name for p in PIPELINE) == PASS_NAMES, "moefx.plan.PASS_NAMES must list the pipeline's passes"


def check(ctx: PassContext, gm: fx.GraphModule | None = None, stage: str | None = None) -> list[Pass]:
    """The passes that will run, in order (all stages, or only `stage`), for `ctx.plan` on `gm` (None: a
    model not captured yet). Raises PlanError when plan.disable switches off a pass a later one needs."""
    disabled = set(ctx.plan.disable)
    provided = {c for p in PIPELINE for c in p.provides}
    facts = {c for c in provided if gm is not None and c.holds(gm)}
    start = 0 if gm is None or stage is None else STAGES.index(stage)
    chosen: list[Pass] = []
    seen: list[Pass] = []
    for p in PIPELINE:
        if STAGES.index(p.stage) < start:
            continue
        applies = p.applies(ctx)
        missing = [c for c in p.requires if not c.input and c not in facts]
        if applies and p.name not in disabled and missing:
            blockers = [q for q in seen if q.name in disabled and q.applies(ctx) and set(q.provides) & set(missing)]
            if blockers:
                names = ", ".join(repr(q.name) for q in blockers)
                raise PlanError(
                    f"pass {p.name!r} needs {', '.join(c.name for c in missing)} ({missing[0].description}), which "
                    f"pass {names} provides, but plan.disable switches it off: remove {names} from disable, or "
                    f"disable {p.name!r} too")
        seen.append(p)
        if not applies or p.name in disabled or missing:
            continue
        facts |= set(p.provides)
        if stage is None or p.stage == stage:
            chosen.append(p)
    return chosen


def run(gm: fx.GraphModule, ctx: PassContext, stage: str, *, dump_dir: str | Path | None = None) -> fx.GraphModule:
    """Run the passes of `stage` that `check` selects; verify after each one; optional numbered dumps."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    passes = check(ctx, gm, stage)
    ran: list[str] = []
    if dump_dir is not None:
        _dump(dump_dir, 0, f"{stage}_input", gm)
    for p in passes:
        try:
            out = p(gm, ctx)
        except (PlanError, AnalysisError, PassError):
            raise
        except MoefxError:
            raise
        except Exception as e:
            raise PassError(f"pass {p.name!r} failed (passes run before it: {list(facts(gm).passes) or 'none'}): "
                            f"{type(e).__name__}: {e}") from e
        if out is not gm:
            out.meta = dict(getattr(out, "meta", {}))
            record_facts(out, passes=(*facts(gm).passes, p.name))
        gm = out
        ran.append(p.name)
        if dump_dir is not None:
            _dump(dump_dir, PIPELINE.index(p) + 1, p.name, gm)
    return gm


def _dump(dump_dir, index: int, name: str, gm: fx.GraphModule) -> None:
    write_atomic(Path(dump_dir) / f"{index:03d}_{name}.py", gm.code)
