"""The runtime: runs the rank graphs the passes produce (it never rewrites them).

launch      torchrun launching: start the ranks, forward signals, name the rank that failed
build       rank graphs, references and generators from a model spec and a plan (on meta, then materialised)
calibrate   the all-to-all cost profile of the job's mesh (`moefx calibrate`)
stats       bytes each collective of a rank graph moves
run_model   the worker program `moefx launch` runs
jobs/       what that program runs on each rank (check, generate, train, distill)

The distributed state the runtime builds on (mesh, gradients, checkpoints, the worker side of a
launch) is `moefx.dist`.

Import the submodules explicitly; importing this package loads none of them.
"""

_LAZY = {"init_from_env": "moefx.dist.worker", "launch": "moefx.runtime.launch", "start": "moefx.runtime.launch",
         "build_mesh": "moefx.dist.mesh"}


def __getattr__(name: str):
    """`moefx.runtime.init_from_env`, `.launch`, `.start`, `.build_mesh`, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
