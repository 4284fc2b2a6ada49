"""Runtime layer under the partition pass: parallel degrees and process groups (`mesh`),
autograd-capable flat / hierarchical all-to-all (`all_to_all`), the flat-vs-hierarchical cost
model (`cost`) and torchrun launching (`launch`).

Only `mesh` and `cost` import without torch.distributed being usable; the others import torch.
"""
from .all_to_all import (HierarchicalSplits, exchange_counts, flat_all_to_all, hierarchical_all_to_all,
                         hierarchical_all_to_all_inverse, hierarchical_splits, permute_chunks)
from .cost import a2a_cost_exprs, choose_hierarchical, crossover_bytes, flat_a2a_time, hierarchical_a2a_time
from .launch import Launch, LaunchFailed, LaunchResult, free_port, init_from_env, launch, start, torchrun_argv, worker
from .mesh import (LayerGroups, LayerParallel, ProcessGroups, ResolvedParallel, build_groups, rank_layout,
                   validate_parallel)

__all__ = [
    "validate_parallel", "ResolvedParallel", "LayerParallel", "rank_layout", "build_groups", "ProcessGroups",
    "LayerGroups",
    "exchange_counts", "flat_all_to_all", "hierarchical_all_to_all", "hierarchical_all_to_all_inverse",
    "hierarchical_splits", "HierarchicalSplits", "permute_chunks",
    "choose_hierarchical", "crossover_bytes", "flat_a2a_time", "hierarchical_a2a_time", "a2a_cost_exprs",
    "launch", "start", "Launch", "LaunchResult", "LaunchFailed", "torchrun_argv", "init_from_env", "worker",
    "free_port",
]
