"""Packing the exported weights into buckets: flat byte buffers (the ``flattened_bucket``
load format of SGLang) with their tensor metadata, and, for the ``tensor`` transport, every
PP stage's buckets handed to every rank."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from srft_mcore.rollout.sync_types import NamedTensors, SourceInfo


def flatten_bucket(bucket: Sequence[tuple[str, torch.Tensor]]):
    """Bytes of all tensors back to back (largest element size first, so every tensor
    starts aligned), plus (names, dtypes, shapes) in that order."""
    items = sorted(bucket, key=lambda kv: -kv[1].element_size())
    flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in items])
    names = [n for n, _ in items]
    dtypes = [str(t.dtype).removeprefix("torch.") for _, t in items]
    shapes = [list(t.shape) for _, t in items]
    return flat, names, dtypes, shapes


def bucket_metadata(names, dtypes, shapes):
    """SGLang's per-tensor metadata of a flat bucket (offsets in bytes)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    out, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        dt = getattr(torch, dtype)
        nbytes = int(torch.Size(shape).numel()) * dt.itemsize
        out.append(FlattenedTensorMetadata(name=name, shape=torch.Size(shape), dtype=dt,
                                           start_idx=offset, end_idx=offset + nbytes,
                                           numel=nbytes))
        offset += nbytes
    return out


def _nbytes(head) -> int:
    _, dtypes, shapes = head
    return sum(int(torch.Size(s).numel()) * getattr(torch, d).itemsize
               for d, s in zip(dtypes, shapes))


def _stage_leads(src: SourceInfo, group=None) -> list[int]:
    """Rank (in ``group``) of one rank per PP stage: it announces the stage's buckets."""
    stages = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, src.pp_rank, group=group)
    return [stages.index(p) for p in range(src.pp)]


def every_stage_bucket(src: SourceInfo, tensors: Callable[[], NamedTensors], bucket_bytes: int,
                       group=None) -> Iterator[tuple[torch.Tensor, tuple]]:
    """``(flat, (names, dtypes, shapes))`` of every PP stage's buckets on every rank, stage
    by stage: a stage's ranks flatten their own (TP-gathered) buckets, the other stages
    receive them by a broadcast over their PP group (on the PP group's device).

    Collective over ``group``: every rank iterates to the end. ``tensors()`` is called on
    every rank of the stage being sent."""
    from srft_mcore.models.bridge import bucketize
    from srft_mcore.launching.distributed import broadcast_object, comm_device

    leads = _stage_leads(src, group) if src.pp > 1 else None
    for stage in range(src.pp):
        local = bucketize(tensors(), bucket_bytes) if src.pp_rank == stage else iter(())
        while True:
            bucket = next(local, None)
            flat, head = None, None
            if bucket is not None:
                flat, *head = flatten_bucket(bucket)
                head = tuple(head)
            del bucket  # the gathered tensors: only the flat copy is needed now
            if src.pp > 1:
                head = broadcast_object(head, group, group_src=leads[stage])
                if head is not None:
                    if flat is None:
                        flat = torch.empty(_nbytes(head), dtype=torch.uint8,
                                           device=comm_device(src.pp_group))
                    dist.broadcast(flat, group=src.pp_group, group_src=stage)
            if head is None:
                break
            yield flat, head
            del flat  # drop this frame's reference before building the next bucket
