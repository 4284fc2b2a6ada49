"""`moefx.distribute`: this rank's GraphModule of a converted model (stage "distribute").

Call under torchrun (or any initialised default process group):

    local = moefx.distribute(moe_model, plan)      # plan.parallel: nodes, devices_per_node, tp, ep
    out = local(inputs)                            # == moe_model(inputs) for the same inputs
    loss.backward(); moefx.reduce_gradients(local)
"""
from __future__ import annotations

import copy
import warnings

import torch.distributed as dist
from torch import fx

from .dist.grads import reduce_gradients as _reduce
from .dist.mesh import build_mesh
from .errors import PlanError
from .facts import placements, record_facts
from .nn.moe import moe_layers
from .parallel import ResolvedParallel, validate_parallel
from .passes import pipeline
from .passes.base import PassContext
from .passes.bind_collectives import bind_collectives
from .placement import complete
from .plan import ParallelPlan, Plan


def resolve(gm: fx.GraphModule, parallel: ParallelPlan | None, world_size: int) -> ResolvedParallel:
    """Validate a plan's [parallel] section against `world_size` and gm's MoE layers (PlanError says
    what to fix)."""
    if parallel is None:
        raise PlanError("distribute needs a [parallel] section in the plan (nodes, devices_per_node, tp, ep)")
    return validate_parallel(parallel, world_size, [m.num_experts for _, m in moe_layers(gm)])


def distribute(gm: fx.GraphModule, plan: Plan, *, mesh=None, tokens_per_rank: int = 4096, profile=None,
               dump_dir=None) -> fx.GraphModule:
    """This rank's GraphModule: weights sharded, collectives inserted as graph nodes and bound to the
    mesh's groups (`moefx.passes.bind_collectives`: torch's functional collectives, separate waits).

    Takes a converted GraphModule and a plan with a [parallel] section; needs an initialised
    torch.distributed default group (moefx.dist.worker.init_from_env()). mesh: from
    `moefx.dist.mesh.build_mesh` (built here when None; collective over all ranks; it binds
    the group names the graph's collectives use). tokens_per_rank: message-size estimate for
    hierarchical_a2a = "auto"; profile: a measured `moefx.cost.CostProfile` for that decision.
    The result shares no tensor with `gm`; `facts(local).placements` records where every tensor
    sits (read by `reduce_gradients`, checkpoints and dumps).
    """
    if not dist.is_initialized():
        raise PlanError("distribute needs torch.distributed initialised: run under torchrun / `moefx launch` "
                        "and call moefx.dist.worker.init_from_env() first")
    resolved = resolve(gm, plan.parallel, dist.get_world_size())
    mesh = mesh if mesh is not None else build_mesh(resolved)
    ctx = PassContext(plan, rank=dist.get_rank(), resolved=resolved, tokens_per_rank=tokens_per_rank,
                      profile=profile)
    local = _own_weights(_finish(pipeline.run(gm, ctx, "distribute", dump_dir=dump_dir), ctx))
    local = bind_collectives(local, mesh.groups)
    local.moefx_mesh = mesh
    return local


def _finish(local: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Record the rank and degrees, and a placement for every tensor (whatever the passes placed)."""
    local.meta = dict(local.meta)
    record_facts(local, rank=ctx.rank, parallel=ctx.resolved,
                 placements=complete(local, placements(local), ctx.resolved))
    return local


def _own_weights(local: fx.GraphModule) -> fx.GraphModule:
    """Deep-copy the rank's module so it shares no parameter or aux-loss sink with the global one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree spec deprecation noise from deepcopy
        out = copy.deepcopy(local)
    out.meta = dict(local.meta)
    return out


def partitioned_view(gm: fx.GraphModule, plan: Plan, rank: int, world_size: int | None = None,
                     tokens_per_rank: int = 4096) -> fx.GraphModule:
    """Rank `rank`'s partitioned graph without any process group, for dumps and inspection: its
    collectives name groups that are not bound, so running it raises GroupNotBound."""
    pp = plan.parallel or ParallelPlan()
    world = world_size or pp.world_size
    if not 0 <= rank < world:
        raise PlanError(f"rank {rank} is outside the world of {world} ranks")
    resolved = resolve(gm, pp, world)
    ctx = PassContext(plan, rank=rank, resolved=resolved, tokens_per_rank=tokens_per_rank)
    out = pipeline.run(gm, ctx, "distribute")
    return _finish(copy.copy(out) if out is gm else out, ctx)


def reduce_gradients(local: fx.GraphModule) -> None:
    """All-reduce the gradients of a distributed GraphModule (see moefx.dist.grads)."""
    _reduce(local)
