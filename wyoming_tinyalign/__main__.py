"""Command line: `wyoming-tinyalign <command> [flags]`. Every flag can also come from the environment
as `WYOMING_TINYALIGN_<FLAG>` (e.g. `WYOMING_TINYALIGN_DATA_DIR=/data`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

# The nightly job runs at `nice` 10 beside the server and whatever else the machine runs. Torch's
# OpenMP threads (GNU's, in its wheels) spin a while when they wait for each other, and a spinning
# thread keeps its core from a thread of the job that a busier program starves: with another program
# busy on one of 2 cores, a real-size training step took 40 s instead of 2.4. The job's threads
# spin briefly, then sleep (1.18 s a step on an idle machine, as with the default; not spinning at all,
# 1.48 s). OpenMP reads this when torch loads, hence here; the server keeps the default.
if sys.argv[1:2] == ["adapt"]:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch
from transformers.utils import logging as hf_logging

from . import __version__
from .adapt import add_adapt_args, add_rollback_args, run_adapt, run_rollback
from .audio import AudioError
from .cpus import cpu_quota
from .evaluate import add_eval_args, run_eval
from .model.bundle import BundleError
from .serve import add_serve_args, run_serve
from .store import StoreError
from .synth import add_synth_args, run_synth
from .train import add_train_args, run_train
from .words import counted

_LOGGER = logging.getLogger(__name__)
ENV_PREFIX = "WYOMING_TINYALIGN_"
_TRUE = {"1", "true", "yes", "on"}


def _env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let `WYOMING_TINYALIGN_<DEST>` set each flag's default (flags given on the command line win)."""
    for action in parser._actions:
        value = os.environ.get(ENV_PREFIX + action.dest.upper())
        if value is None or action.dest == "help":
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in _TRUE
        else:
            action.default = value  # argparse applies `type` to string defaults
        action.required = False


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: all cores, as many as a CPU quota allows)",
    )
    parser.add_argument("--debug", action="store_true", help="log DEBUG messages")


def _add_dev_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="bundle folder to write (a build stopped there goes on)"
    )
    parser.add_argument("--size", choices=("micro", "small"), default="small")
    parser.add_argument("--seed", type=int, default=0)


def _run_dev_model(args: argparse.Namespace) -> int:
    from .devmodel import build_dev_model

    report = build_dev_model(args.out, args.size, args.seed)
    print(json.dumps(report, indent=2))
    return 0


COMMANDS = {
    "serve": ("run the assistant", add_serve_args, run_serve),
    "synth": ("render synthetic household speech with espeak-ng", add_synth_args, run_synth),
    "dev-model": ("build the offline development model", _add_dev_model_args, _run_dev_model),
    "eval": ("evaluate a model on a manifest", add_eval_args, run_eval),
    "train": ("align a projector (EmbedLink or generative)", add_train_args, run_train),
    "adapt": ("adapt the projector to the household's voices (nightly job)", add_adapt_args, run_adapt),
    "rollback": ("serve an earlier projector version", add_rollback_args, run_rollback),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wyoming-tinyalign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        add_args(cmd)
        _add_common(cmd)
        _env_defaults(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:  # transformers' "Loading weights" bars: carriage returns in the add-on's log
        hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif (quota := cpu_quota()) is not None and math.floor(quota) < torch.get_num_threads():
        threads = max(1, math.floor(quota))
        _LOGGER.info(
            "a CPU quota of %.3g CPUs (cgroup): %s, not %d",
            quota, counted(threads, "torch thread"), torch.get_num_threads(),
        )  # fmt: skip
        torch.set_num_threads(threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but CUDA is not available here", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except (BundleError, AudioError, StoreError, OSError, ValueError) as err:
        _LOGGER.debug("failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
