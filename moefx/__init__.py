"""moefx: torch.fx passes that turn dense Transformers into DeepSpeed-MoE-style PR-MoE / MoS models.

    import moefx
    plan = moefx.Plan.from_dict({"moe": {"experts": [32] * 10 + [64] * 2, "every": 2, "residual": True}})
    moe_model = moefx.convert(model, plan, example_inputs=(input_ids,))
    loss = task_loss(moe_model(input_ids)) + moefx.aux_loss(moe_model)
"""
from .analysis.blocks import Block, find_blocks
from .analysis.ffn import FFN, find_ffns
from .capture import capture
from .convert import convert
from .count import ParamCount, count_params
from .distribute import distribute, partitioned_view, reduce_gradients
from .dump import dump
from .errors import (
                     AnalysisError,
                     BackendError,
                     CaptureError,
                     InexactConversionWarning,
                     MoefxError,
                     PassError,
                     PlanError,
                     TrainError,
)
from .gen.generator import Generator, convert_generator
from .nn.aux import aux_loss
from .nn.routing import Routing, combine, dispatch, route
from .passes.pipeline import PIPELINE
from .passes.shrink import shrink
from .plan import LoweringPlan, MoEPlan, ParallelPlan, Plan, StudentPlan
from .saving import load, load_generator, save
from .train.distill import DistillError, DistillResult, distill

__all__ = [
    "Block", "find_blocks", "FFN", "find_ffns", "capture", "convert", "PIPELINE", "ParamCount", "count_params",
    "AnalysisError", "BackendError", "CaptureError", "MoefxError", "PassError", "PlanError", "TrainError", "aux_loss",
    "InexactConversionWarning", "Routing",
    "combine", "dispatch", "route", "LoweringPlan", "MoEPlan", "ParallelPlan", "Plan", "StudentPlan", "distill",
    "DistillResult", "DistillError", "dump", "distribute", "partitioned_view", "reduce_gradients", "shrink",
    "convert_generator", "Generator", "save", "load", "load_generator",
]
__version__ = "0.1.0"
