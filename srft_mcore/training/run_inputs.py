"""What a training run is given (a config file, ``a.b.c=value`` overrides, ``--resume``),
read and checked without torch.

``srft-train`` checks a run here in the launcher process, before torchrun starts any rank, so
that bad input ends in one paragraph and not in a traceback per rank; every rank loads the
run again through the same functions.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

from srft_mcore.config import Config, ConfigError, load_config, validate


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every trainer launch takes (ranks and launcher alike)."""
    parser.add_argument("--config", help="YAML config (see examples/configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    return parser


def run_arguments(args: argparse.Namespace) -> list:
    """``args``' run arguments as a command line again (what each rank is given)."""
    return ((["--config", args.config] if args.config else []) + list(args.overrides)
            + (["--resume"] if args.resume else []))


def load_checked_config(config: Optional[str], overrides: list, resume: bool,
                        world_size: int) -> Config:
    """The run's config, checked against the world size and, with ``model.hf_path``, the
    model's config.json, architecture and tokenizer files (no torch: the model builder's own
    checks come later, on the ranks)."""
    cfg = load_config(config, list(overrides) + (["checkpoint.resume=true"] if resume else []))
    hf = None
    if cfg.model.hf_path:
        from srft_mcore.config import load_hf_config
        from srft_mcore.models import get_architecture
        from srft_mcore.models.tiny import check_tokenizer_files

        hf = load_hf_config(cfg.model.hf_path)
        get_architecture(hf)
        check_tokenizer_files(cfg.model.hf_path)
    validate(cfg, world_size=world_size, hf_config=hf)
    return cfg


def run_dirs(cfg: Config) -> tuple:
    """The run directory and the checkpoint directory, absolute."""
    run_dir = os.path.abspath(cfg.logging.run_dir)
    return run_dir, os.path.abspath(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"))


def refuse_to_overwrite(cfg: Config) -> None:
    """A fresh run never replaces an earlier run's metrics or checkpoints."""
    if cfg.checkpoint.resume:
        return
    run_dir, ckpt_dir = run_dirs(cfg)
    earlier = [p for p in (os.path.join(run_dir, "metrics.jsonl"),
                           os.path.join(ckpt_dir, "latest")) if os.path.isfile(p)]
    if earlier:
        raise ConfigError(
            f"config error: logging.run_dir={run_dir!r} already holds a run "
            f"({', '.join(earlier)}). Fix: add --resume to continue it, or choose a new "
            f"logging.run_dir (and checkpoint.dir); nothing was changed")


def check_errors() -> tuple:
    """Exceptions of :func:`load_checked_config` and :func:`refuse_to_overwrite` that mean
    the input is wrong (a missing config.json or tokenizer file is a FileNotFoundError)."""
    from srft_mcore.models import UnsupportedArchitecture

    return (ConfigError, FileNotFoundError, UnsupportedArchitecture)
