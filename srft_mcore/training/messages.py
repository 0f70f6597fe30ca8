"""What a training run tells its user: rank 0's log lines, and :class:`TrainingStopped`, the
one paragraph a run ends with when it cannot go on."""
from __future__ import annotations


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. gradients non-finite K times in a row); one paragraph."""


def log0(*args):
    """Print on global rank 0 only (before the process groups exist: on every process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[srft]", *args, flush=True)
