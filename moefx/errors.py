"""Errors moefx raises. Each message names the problem and what to change."""


class MoefxError(Exception):
    """Base class of every error moefx raises on purpose."""


class PlanError(MoefxError, ValueError):
    """A plan is malformed, or does not fit the model / world it is applied to."""


class CaptureError(MoefxError, RuntimeError):
    """A model could not be captured into an FX graph."""


class AnalysisError(MoefxError, RuntimeError):
    """The graph does not contain what a pass needs (e.g. no FFN blocks were found)."""


class PassError(MoefxError, RuntimeError):
    """A pass produced an invalid graph; the message names the pass and the ones before it."""


class BackendError(MoefxError, RuntimeError):
    """A requested implementation cannot run here (e.g. Triton without a GPU)."""


class TrainError(MoefxError, ValueError):
    """Training cannot start or go on: arguments, batches or models a trainer cannot train with, a
    non-finite loss or gradient, a checkpoint past the run."""


class DistillError(TrainError):
    """The same, raised by distillation (`moefx.distill`): a TrainError of a KD run."""


class CheckpointError(MoefxError, ValueError):
    """A checkpoint is missing, damaged or does not fit the model it is loaded into."""


class InexactConversionWarning(UserWarning):
    """The plan's converted model only approximates the dense one at initialisation (token dropping,
    re-initialised or perturbed experts, probability-weighted top-1); jobs that mean it filter it."""
