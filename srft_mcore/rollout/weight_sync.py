"""Weight sync: the sharded Megatron policy -> SGLang servers, after every optimizer step.

One collective, three transports (``mode``):

* ``distributed``: a weight-update process group per (PP stage, server), created once
  (NCCL on GPU, gloo on CPU) between the stage's source rank and the server's ranks; each
  bucket is one flattened tensor broadcast into ``/update_weights_from_distributed``.
* ``tensor`` (colocated): each bucket is handed over as a handle, not bytes, through
  ``/update_weights_from_tensor``: CUDA IPC on GPU, POSIX shared memory (torch's
  ``file_system`` sharing strategy) on CPU. The request carries one handle per server TP
  rank, each to a copy of the bucket on that rank's own GPU (see
  :mod:`~srft_mcore.rollout.tensor_transport`).
* ``disk`` (the fallback): each source writes its buckets as HF safetensors shards of one
  directory, then ``/update_weights_from_disk`` loads it.

:func:`sync_weights` is collective over the trainer's ranks (every rank calls it):

1. rank 0: on each server pause generation, flush the KV cache and, where the server has
   the session routes, ``/begin_weight_update``;
2. the transport moves the buckets (:meth:`Transport.transfer`). ``distributed`` and
   ``disk``: every rank with ``dp_rank == 0`` iterates the bridge export of its PP stage
   (TP shards are all-gathered), cut into buckets of ``bucket_bytes``; the stage's
   ``tp_rank == 0`` rank is the source and sends them; a source whose sending fails keeps
   iterating (its TP peers are in the same all-gathers) and reports the error. ``tensor``:
   every rank gets every bucket on its own device and rank 0 posts the handles;
3. rank 0: ``/end_weight_update`` (session servers), tag the weight version, flush (session
   servers), continue generation and read the version back from ``/model_info``.

Which of the two HTTP protocols a server gets depends on the routes it serves, read once at
start-up by :func:`~srft_mcore.rollout.server_routes.check_servers`: SGLang 0.5.23 loads
tensor and distributed updates only inside a begin/end session, SGLang 0.5.19 has no
session routes and takes pause -> flush -> update -> version -> continue.

Outcomes are agreed on all ranks after steps 1 and 2, so either every rank returns
:class:`SyncStats` or every rank raises :class:`WeightSyncError`; the model is only read,
so a failed sync can simply be called again (a ``distributed`` group that failed is torn
down and created anew on the next call).

The transports live in their own modules (:mod:`~srft_mcore.rollout.distributed_transport`,
:mod:`~srft_mcore.rollout.tensor_transport`, :mod:`~srft_mcore.rollout.disk_transport`), the
per-server HTTP steps in :mod:`~srft_mcore.rollout.update_protocol`, the route checks in
:mod:`~srft_mcore.rollout.server_routes` and the bucket packing in
:mod:`~srft_mcore.rollout.sync_buckets`.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Collection, Iterator, Optional, Sequence

import torch

from srft_mcore.launching.distributed import all_gather_objects
from srft_mcore.rollout.disk_transport import DiskTransport
from srft_mcore.rollout.distributed_transport import DistributedTransport
from srft_mcore.rollout.errors import WeightSyncError
from srft_mcore.rollout.sync_types import (MODES, NamedTensors, SourceInfo, SyncStats,
                                           rank_error)
from srft_mcore.rollout.tensor_transport import TensorTransport
from srft_mcore.rollout.transport import Transport
from srft_mcore.rollout.update_protocol import abandon_update, begin_update, end_update


def make_transport(mode: str, work_dir: Optional[str] = None, server_tp: int = 1,
                   master_address: str = "127.0.0.1",
                   placement: Optional[Sequence[str]] = None) -> Transport:
    if mode == "disk":
        if work_dir is None:
            raise ValueError("weight sync mode 'disk' needs a work_dir for the snapshots")
        return DiskTransport(os.path.join(work_dir, "weight_sync"))
    if mode == "tensor":
        return TensorTransport(server_tp=server_tp, placement=placement)
    if mode == "distributed":
        return DistributedTransport(master_address=master_address, server_tp=server_tp)
    raise ValueError(f"weight sync mode {mode!r} is not one of {MODES}")


# ---------------------------------------------------------------------- the collective
def _agree(error: Optional[tuple], extra=None, group=None) -> tuple[list[tuple], list]:
    """All ranks exchange (error, extra); returns every rank's errors and extras."""
    out = all_gather_objects((error, extra), group)
    return [e for e, _ in out if e], [x for _, x in out]


def export_stream(model_chunks, hf_config: dict, src: SourceInfo,
                  dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """This PP stage's HF tensors, gathered over TP by the bridge."""
    from srft_mcore.models.bridge import export_hf_weights

    return export_hf_weights(model_chunks, hf_config, tp_group=src.tp_group, dtype=dtype)


def sync_weights(transport: Transport, urls: Sequence[str], src: SourceInfo, version: str,
                 tensors: Callable[[], NamedTensors], bucket_bytes: int,
                 group=None, sessions: Optional[Collection[str]] = None) -> SyncStats:
    """Push this step's weights to every server in ``urls`` (collective; see module doc).

    ``tensors()`` returns this rank's stream of ``(hf_name, full_tensor)`` (e.g. ``lambda:
    export_stream(model, hf, src)``); it is called on ranks with ``src.exports``, and by the
    ``tensor`` transport on every rank. ``sessions``: the servers that get the begin/end
    weight-update session (:attr:`.ServerRoutes.session`); None: every server.
    """
    t0 = time.perf_counter()
    urls = list(urls)
    session = {u: sessions is None or u in sessions for u in urls}
    error = None
    if src.rank == 0:
        try:
            for url in urls:
                begin_update(url, session[url])
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = rank_error("rank 0: begin", e)
    if not error:
        try:
            transport.prepare(urls, src, version, group=group)
        except Exception as e:  # noqa: BLE001
            error = rank_error(f"rank {src.rank}: prepare {transport.mode}", e)
    errors, _ = _agree(error, group=group)
    if errors:
        return _fail(transport, urls, src, errors, session)

    t1 = time.perf_counter()
    sent, buckets, error = transport.transfer(urls, src, tensors, bucket_bytes, version, group)
    errors, counts = _agree(error, (sent, buckets), group=group)
    transfer_s = time.perf_counter() - t1
    if errors:
        return _fail(transport, urls, src, errors, session)

    if src.rank == 0:
        try:
            transport.commit(urls, version)
            for url in urls:
                end_update(url, version, session[url])
        except Exception as e:  # noqa: BLE001
            error = rank_error("rank 0: commit/verify", e)
    errors, _ = _agree(error, group=group)
    if errors:
        return _fail(transport, urls, src, errors, session)
    return SyncStats(version=version, mode=transport.mode, seconds=time.perf_counter() - t0,
                     transfer_seconds=transfer_s, bytes=sum(c[0] for c in counts),
                     buckets=sum(c[1] for c in counts if c), servers=len(urls))


def _fail(transport, urls, src, errors, session):
    if src.rank == 0:
        for url in urls:
            abandon_update(url, session[url])
    transport.failed(urls)
    raise WeightSyncError("weight sync failed: " +
                          "; ".join(text for text, _ in errors),
                          [w for _, where in errors for w in where])

