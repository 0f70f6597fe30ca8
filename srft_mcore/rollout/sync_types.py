"""What the weight-sync modules share: the sync modes, a rank's place in the sync
(:class:`SourceInfo`), the statistics of one sync, and how a rank reports its failure."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

MODES = ("distributed", "tensor", "disk")
NamedTensors = Iterable[tuple[str, torch.Tensor]]


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``distributed`` (works on GPU and CPU; ``tensor`` needs colocation and
    ``disk`` a shared file system, so both are chosen explicitly)."""
    if mode == "auto":
        return "distributed"
    if mode not in MODES:
        raise ValueError(f"rollout.weight_sync={mode!r}: expected auto or one of {MODES}")
    return mode


@dataclass
class SyncStats:
    version: str
    mode: str
    seconds: float
    """Wall time of the whole sync, pause to verified version."""
    transfer_seconds: float
    """Export + send (step 2) only."""
    bytes: int
    """Bytes sent by all source ranks to one server."""
    buckets: int
    servers: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


@dataclass(frozen=True)
class SourceInfo:
    """Where this rank sits for the sync; built from ``ParallelLayout`` (see :func:`source_info`)."""

    rank: int
    pp_rank: int
    exports: bool
    """This rank takes part in the export (dp_rank == 0): it iterates in its TP group. The
    ``tensor`` transport has every rank export, so that each GPU holds its own copy."""
    sends: bool
    """This rank is its PP stage's source (dp_rank == 0 and tp_rank == 0)."""
    tp_group: Optional[object] = None
    pp: int = 1
    pp_group: Optional[object] = None


def source_info(layout) -> SourceInfo:
    return SourceInfo(rank=layout.rank, pp_rank=layout.pp_rank, exports=layout.dp_rank == 0,
                      sends=layout.dp_rank == 0 and layout.tp_rank == 0,
                      tp_group=layout.tp_group, pp=layout.pp, pp_group=layout.pp_group)


def rank_and_size(group=None) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) without torch.distributed."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rank_error(prefix: str, e: BaseException) -> tuple[str, list]:
    """A rank's failure as the ranks agree on it: text, and the (server, route) pairs
    that failed when the exception names them."""
    return f"{prefix}: {e}", list(getattr(e, "where", []))
