"""What the sub-commands share: plan loading, device checks, help formatting, model options."""
from __future__ import annotations

import argparse

import torch

from ..errors import MoefxError
from ..plan import Plan
from ..runtime.run_model import DefaultsFormatter


class Parser(argparse.ArgumentParser):
    """Sub-command parsers show every option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def load_plan(path: str | None):
    """The plan file's Plan, or Plan.default() without one."""
    return Plan.from_file(path) if path else Plan.default()


def check_device(device: str) -> str:
    """`device` if this torch can use it, else a MoefxError naming the fix."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        build = torch.__version__
        raise MoefxError(f"--device {device}, but this torch ({build}) sees no CUDA device"
                         + (" (it is a CPU-only build: install a CUDA build of torch)" if "+cpu" in build else "")
                         + "; use --device cpu")
    return device


def model_args(sp: argparse.ArgumentParser, default: str | None = None, load: bool = False) -> None:
    """MODEL, --weights, --plan, --device, --seed (load: --load too)."""
    sp.add_argument("model", nargs="?", default=None,
                    help="built-in name (gpt2-tiny, llama-tiny, bert-tiny, ...) or package.module:function, or - "
                         "with --weights" + (f" (default: {default})" if default else ""))
    sp.add_argument("--weights", metavar="DIR", help="Hugging Face folder (config.json + safetensors) of the dense "
                                                    "model")
    if load:
        sp.add_argument("--load", metavar="PATH", help="a training checkpoint or a folder written by moefx.save: "
                                                      "the model and plan it records")
    sp.add_argument("--plan", help="plan file (.toml / .json); without one: the plan --load records, else "
                                   "moefx.Plan.default()")
    sp.set_defaults(init="model", batch=2, seq=8, default_model=default)
    sp.add_argument("--device", default="cpu", help="cpu, cuda or meta (meta: no memory, no numerics)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the built-in's init and the example inputs")
