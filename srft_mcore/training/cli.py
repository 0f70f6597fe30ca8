"""``srft-train``: check a run, then start its trainer ranks.

  srft-train --nproc-per-node N [--config FILE] [--resume] [a.b.c=value ...]
  srft-train [--config FILE] [--resume] [a.b.c=value ...]              (one process)
  srft-train --check [--nnodes M] [--nproc-per-node N] [--config FILE] [--resume] [a.b.c=value ...]

With ``--nproc-per-node N`` (also spelt ``--nproc_per_node``, as torchrun does) the run is
checked in this process first, without torch: the config and its parallel sizes against N
ranks, the model's config.json, architecture and tokenizer files, an earlier run in the run
directory. Bad input ends here, ``srft-train: <one paragraph>`` and exit status 2, instead
of a traceback from torchrun; otherwise this process becomes ``python -m
torch.distributed.run --standalone --nproc_per_node N -m srft_mcore.training ...`` with the
same run arguments. Without it the trainer runs in this process, as one rank.

``--check`` only checks (exit status 0, or 2 with the paragraph), for launchers that start
torchrun themselves (examples/multinode/): the world size is M nodes x N ranks; without
``--nproc-per-node`` the checks that depend on it are left out.
"""
from __future__ import annotations

import argparse
import os
import sys

from srft_mcore.training.run_inputs import (add_run_arguments, check_errors,
                                            load_checked_config, refuse_to_overwrite,
                                            run_arguments)

RANK_MODULE = "srft_mcore.training"
"""What torchrun runs on every rank (``python -m srft_mcore.training``)."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srft-train", description="SRFT / SFT / GRPO / LUFFY training on Megatron-Core "
        "with SGLang rollouts: checks the run, then starts TP*PP*CP*DP trainer ranks under "
        "torchrun (--nproc-per-node), or one rank in this process")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=_positive, metavar="N",
                   help="trainer ranks on this node: check the run, then start them under "
                   "torchrun --standalone")
    p.add_argument("--check", action="store_true",
                   help="only check the run (exit status 0, or 2 with the reason); for "
                   "launchers that start torchrun themselves")
    p.add_argument("--nnodes", type=_positive, metavar="M",
                   help="with --check: nodes of --nproc-per-node ranks each (default 1)")
    return add_run_arguments(p)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides before or after --resume
    if args.nnodes is not None and not args.check:
        parser.error("--nnodes goes with --check: a run on several nodes starts torchrun on "
                     "each of them (examples/multinode/srft_torchrun_multinode.sh)")
    return args


def check(args: argparse.Namespace, world_size) -> None:
    """Raise one of :func:`check_errors` when the run cannot start (``world_size`` None:
    the checks that depend on it are left out)."""
    cfg = load_checked_config(args.config, args.overrides, args.resume, world_size)
    refuse_to_overwrite(cfg)


def torchrun_command(args: argparse.Namespace) -> list:
    """The single-node torchrun launch of ``args.nproc_per_node`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={args.nproc_per_node}", "-m", RANK_MODULE,
            *run_arguments(args)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.check or args.nproc_per_node):  # one rank, here
        from srft_mcore.training.trainer import main as run_rank

        return run_rank(run_arguments(args))
    world = args.nproc_per_node * (args.nnodes or 1) if args.nproc_per_node else None
    try:
        check(args, world)
    except check_errors() as e:
        print(f"srft-train: {e}", file=sys.stderr, flush=True)
        return 2
    if args.check:
        return 0
    cmd = torchrun_command(args)
    sys.stdout.flush()
    # torchrun takes this process over: signals and the exit status are its own
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
