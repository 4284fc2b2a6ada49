"""The `moefx` command line: a thin wrapper over the library functions.

    moefx convert [MODEL] [--plan plan.toml]     convert, print the layer table, check vs dense
    moefx dump MODEL --plan plan.toml --format {code,table,dot,svg,json} [--stage ...] [--output F]
    moefx generate MODEL --plan plan.toml --prompt-ids 1,2,3 --max-new-tokens 32 [--compile] [--load DIR]
    moefx train MODEL --plan plan.toml --data corpus.bin --steps N [--resume ckpt]   one-process training job
    moefx distill [MODEL] --plan plan.toml --steps N --kd-stop K   staged-KD MoS student (needs [student])
    moefx launch --nproc-per-node G --plan plan.toml MODEL [--check] [--compile]   distributed job (torchrun)
    moefx calibrate --nnodes N --nproc-per-node G -o profile.json   measure the all-to-all cost profile
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

import torch

from ..errors import MoefxError
from . import convert, distill, generate, launch, train
from .common import Parser

__all__ = ["main", "build_parser"]


def _version() -> str:
    try:
        return importlib.metadata.version("moefx")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree that is not installed
        return "unknown"



def build_parser() -> argparse.ArgumentParser:
    """The `moefx` parser: one sub-command per library job (see the module docstring)."""
    p = argparse.ArgumentParser(prog="moefx", description=__doc__.splitlines()[0],
                                epilog="run `moefx COMMAND --help` for a command's options")
    p.add_argument("--version", action="version", version=f"moefx {_version()} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    for module in (convert, generate, train, distill, launch):
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moefx` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd is None:                           # a bare `moefx`: what it can do, not a usage error
        parser.print_help()
        return 2
    try:
        if getattr(args, "takes_rest", False):
            return args.func(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except MoefxError as e:
        print(f"moefx: error: {e}", file=sys.stderr)
        return 2
