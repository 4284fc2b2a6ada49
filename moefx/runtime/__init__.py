"""The runtime: runs the rank graphs the passes produce (it never rewrites them).

mesh        the job's DeviceMesh and its named groups (`build_mesh`)
grads       gradient reduction and the global gradient norm, from placement records
all_to_all  eager flat / hierarchical all-to-all on ProcessGroups (scripts, benchmarks)
checkpoint  sharded, reshardable DCP checkpoints
launch      torchrun launching and the worker-side helpers (`init_from_env`, `worker`)
run_model   the worker program `moefx launch` runs

Import the submodules explicitly; importing this package loads none of them.
"""

_LAZY = {"init_from_env": "launch", "launch": "launch", "start": "launch", "build_mesh": "mesh"}


def __getattr__(name: str):
    """`moefx.runtime.init_from_env`, `.launch`, `.start`, `.build_mesh`, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
