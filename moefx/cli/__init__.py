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
import sys

from ..errors import MoefxError
from . import convert, distill, generate, launch, train
from .common import Parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moefx", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for module in (convert, generate, train, distill, launch):
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moefx` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_rest", False):
            return args.func(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except MoefxError as e:
        print(f"moefx: error: {e}", file=sys.stderr)
        return 2
