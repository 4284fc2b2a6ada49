"""`moefx.distribute`: this rank's GraphModule of a converted model (partition + hierarchical a2a).

Call under torchrun (or any initialised default process group):

    local = moefx.distribute(moe_model, plan)      # plan.parallel: nodes, devices_per_node, tp, ep
    out = local(inputs)                            # == moe_model(inputs) for the same inputs
    loss.backward(); moefx.reduce_gradients(local)
"""
from __future__ import annotations

from torch import fx

from .nn.moe import moe_layers
from .errors import PlanError
from .passes.hierarchical_a2a import HierarchicalA2A
from .passes.infra import run_pipeline
from .passes.partition import Partition
from .plan import ParallelPlan, Plan
from .runtime.mesh import ResolvedParallel, build_groups, validate_parallel


def resolve(gm: fx.GraphModule, parallel: ParallelPlan | None, world_size: int) -> ResolvedParallel:
    """Validate a plan's [parallel] section against `world_size` and gm's MoE layers (PlanError says
    what to fix)."""
    if parallel is None:
        raise PlanError("distribute needs a [parallel] section in the plan (nodes, devices_per_node, tp, ep)")
    return validate_parallel(parallel, world_size, [m.num_experts for _, m in moe_layers(gm)])


def distribute(gm: fx.GraphModule, plan: Plan, *, groups=None, tokens_per_rank: int = 4096,
               dump_dir=None) -> fx.GraphModule:
    """This rank's GraphModule: weights sharded, collectives inserted as graph nodes.

    Takes a converted GraphModule and a plan with a [parallel] section; needs an initialised
    torch.distributed default group (moefx.runtime.init_from_env()). groups: from
    `moefx.runtime.build_groups` (built here when None; collective over all ranks).
    tokens_per_rank: message-size estimate for hierarchical_a2a = "auto".
    The result's `.moefx_groups` holds the groups (for `reduce_gradients`).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise PlanError("distribute needs torch.distributed initialised: run under torchrun / `moefx launch` "
                        "and call moefx.runtime.init_from_env() first")
    resolved = resolve(gm, plan.parallel, dist.get_world_size())
    groups = groups if groups is not None else build_groups(resolved)
    passes = [Partition(dist.get_rank(), resolved, groups), HierarchicalA2A(resolved, groups, tokens_per_rank)]
    local = _own_weights(run_pipeline(gm, plan, passes, dump_dir=dump_dir))
    local.moefx_groups = groups
    return local


def _own_weights(local: fx.GraphModule) -> fx.GraphModule:
    """Deep-copy the rank's module so it shares no parameter or aux-loss sink with the global one
    (process groups are kept, not copied)."""
    import copy

    import torch.distributed as dist

    memo = {}
    for mod in local.modules():
        for value in vars(mod).values():
            if isinstance(value, dist.ProcessGroup):
                memo[id(value)] = value
    out = copy.deepcopy(local, memo)
    out.meta = dict(local.meta)
    return out


def partitioned_view(gm: fx.GraphModule, plan: Plan, rank: int, world_size: int | None = None,
                     tokens_per_rank: int = 4096) -> fx.GraphModule:
    """Rank `rank`'s partitioned graph without any process group (for dumps and inspection)."""
    pp = plan.parallel or ParallelPlan()
    world = world_size or pp.world_size
    if not 0 <= rank < world:
        raise PlanError(f"rank {rank} is outside the world of {world} ranks")
    resolved = resolve(gm, pp, world)
    return run_pipeline(gm, plan, [Partition(rank, resolved), HierarchicalA2A(resolved, None, tokens_per_rank)])


def reduce_gradients(local: fx.GraphModule) -> None:
    """All-reduce the gradients of a distributed GraphModule (see moefx.runtime.grads)."""
    from .runtime.grads import reduce_gradients as _reduce

    _reduce(local, local.moefx_groups)
