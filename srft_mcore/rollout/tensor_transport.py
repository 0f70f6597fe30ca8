"""The ``tensor`` weight sync, for colocated servers (on the trainer's GPUs): each bucket is
handed over as a handle, not bytes, through ``/update_weights_from_tensor``: CUDA IPC on GPU,
POSIX shared memory (torch's ``file_system`` sharing strategy) on CPU. The request carries
one handle per server TP rank, each to a copy of the bucket on that rank's own GPU."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from srft_mcore.rollout.errors import WeightSyncError
from srft_mcore.rollout.sync_buckets import bucket_metadata, every_stage_bucket
from srft_mcore.rollout.sync_types import rank_and_size, rank_error
from srft_mcore.rollout.transport import Transport
from srft_mcore.rollout.update_protocol import post


class TensorTransport(Transport):
    """Colocated servers: each bucket is passed by handle, one per server TP rank.

    Every rank gets every bucket on its own device (:func:`every_stage_bucket`); the ranks
    that :func:`colocated_plan` puts on a server's GPUs serialize a handle to *their* copy,
    rank 0 gathers the handles and posts one ``/update_weights_from_tensor`` per server with
    one entry per server TP rank (each TP rank opens only its own, so torch's CUDA IPC
    reference counting holds). Every rank keeps its copy until rank 0 reports that all
    servers have answered: torch then keeps the block out of the caching allocator until
    the server has released it."""

    mode = "tensor"

    def __init__(self, server_tp: int = 1, placement: Optional[Sequence[str]] = None):
        self.server_tp = server_tp
        self.placement = list(placement) if placement else None
        """Every server's URL in launch order (server ``i`` on GPUs ``i*T ..``); a sync
        of some of them (a restarted one) must still find each on its own GPUs."""
        self._plan: list[list[int]] = []

    def plan(self, urls: Sequence[str], world: int, on_gpu: bool) -> list[list[int]]:
        """:func:`colocated_plan` for the servers ``urls``, placed by :attr:`placement`."""
        order = self.placement or list(urls)
        full = colocated_plan(len(order), self.server_tp, world, on_gpu,
                              ranks_per_node(world))
        return [full[order.index(u)] for u in urls]

    def prepare(self, urls, src, version, group=None):
        rank, world = rank_and_size(group)
        on_gpu = torch.cuda.is_available()
        self._plan = self.plan(urls, world, on_gpu)
        if not any(rank in ranks for ranks in self._plan):
            return
        if on_gpu:
            local = int(os.environ.get("LOCAL_RANK", src.rank))
            if local != src.rank % ranks_per_node(world):
                raise WeightSyncError(
                    f"colocated tensor mode: trainer rank {src.rank} has LOCAL_RANK={local}, "
                    f"but the servers' GPUs are matched to ranks numbered node by node "
                    f"(rank = node * ranks_per_node + LOCAL_RANK). Fix: launch with torchrun's "
                    f"default rank assignment, or rollout.weight_sync=distributed")
        else:
            # the default fd-passing strategy needs the receiver to share our authkey
            torch.multiprocessing.set_sharing_strategy("file_system")
            _detach_shm_manager_from_stdio()

    def transfer(self, urls, src, tensors, bucket_bytes, version, group=None):
        from srft_mcore.launching.distributed import broadcast_object

        rank, _ = rank_and_size(group)
        holds = any(rank in ranks for ranks in self._plan)
        sent = buckets = 0
        error = None  # once set (on every rank alike), buckets are only iterated
        for flat, head in every_stage_bucket(src, tensors, bucket_bytes, group):
            if error is not None:
                continue
            handle, mine = None, None
            if holds:
                try:
                    handle = serialize_bucket(flat, bucket_metadata(*head))
                except Exception as e:  # noqa: BLE001 - reported by rank 0
                    mine = f"rank {rank}: serialize: {e}"
            gathered = _gather_to_rank0((handle, mine), group)
            status = None
            if rank == 0:
                status = next(((err, []) for _, err in gathered if err), None)
                if status is None:
                    try:
                        self._post(urls, server_payloads([h for h, _ in gathered], self._plan))
                        sent += flat.numel()
                        buckets += 1
                    except Exception as e:  # noqa: BLE001
                        status = rank_error("rank 0: update_weights_from_tensor", e)
            # until here every rank holds its copy (and its handle): the servers have read it
            error = broadcast_object(status, group)
            del flat, handle, gathered
        if holds and torch.cuda.is_available():
            torch.cuda.ipc_collect()  # blocks the servers have released go back to the pool
        return sent, buckets, error if rank == 0 else None

    def _post(self, urls, payloads) -> None:
        for url, entries in zip(urls, payloads):
            post(url, "/update_weights_from_tensor",
                 {"serialized_named_tensors": entries, "load_format": "flattened_bucket",
                  "flush_cache": False})


def _detach_shm_manager_from_stdio() -> None:
    """The ``file_system`` strategy starts ``torch_shm_manager`` on first use, which inherits
    stdout/stderr and keeps them open until every consumer (the server) exits; a parent that
    reads our output through a pipe would wait for it. Start it once with /dev/null instead."""
    if getattr(_detach_shm_manager_from_stdio, "done", False):
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        torch.zeros(1).share_memory_()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
    _detach_shm_manager_from_stdio.done = True


def ranks_per_node(world_size: int) -> int:
    """Trainer ranks per node (torchrun's LOCAL_WORLD_SIZE; the whole world without it)."""
    return max(1, min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))


def servers_of_node(num_servers: int, nodes: int, node: int) -> list[int]:
    """The colocated servers node ``node`` hosts: an equal share, in order."""
    if num_servers % nodes:
        raise WeightSyncError(
            f"colocated servers run on every node of the trainer, an equal share each: "
            f"rollout.num_servers={num_servers} does not divide among {nodes} nodes. Fix: "
            f"rollout.num_servers a multiple of {nodes}")
    per = num_servers // nodes
    return list(range(node * per, (node + 1) * per))


def colocated_plan(num_servers: int, server_tp: int, world_size: int,
                   on_gpu: bool, per_node: Optional[int] = None) -> list[list[int]]:
    """For each server, the trainer rank whose copy of a bucket each of its TP ranks opens.

    Colocated servers run on every node of the trainer, an equal share each
    (:func:`servers_of_node`): server ``s`` is node ``k``'s ``j``-th, on that node's GPUs
    ``j*T .. j*T+T-1`` (``--base-gpu-id j*T``), where the node's trainer ranks with the same
    local numbers train: TP rank ``r`` of server ``s`` reads from trainer rank
    ``k * per_node + j*T + r``. Shared memory on CPU can be opened by any process of the
    node, so there the ranks wrap around within the node."""
    per_node = per_node or world_size
    nodes = max(1, world_size // per_node)
    share = len(servers_of_node(num_servers, nodes, 0))
    if on_gpu and share * server_tp > per_node:
        raise WeightSyncError(
            f"colocated tensor mode: {share} servers x server_tp {server_tp} need "
            f"{share * server_tp} GPUs on each node shared with trainer ranks, but a node has "
            f"{per_node} ranks. Fix: fewer servers (or a smaller server_tp), or "
            f"rollout.weight_sync=distributed for servers on their own GPUs")
    out = []
    for s in range(num_servers):
        k, j = divmod(s, share)
        local = [j * server_tp + r for r in range(server_tp)]
        out.append([k * per_node + (g if on_gpu else g % per_node) for g in local])
    return out


def serialize_bucket(flat: torch.Tensor, metadata) -> str:
    """One server TP rank's entry of ``serialized_named_tensors``: a handle to ``flat``
    (CUDA IPC or shared memory; the bytes stay where they are) plus the tensor metadata.
    The caller must keep ``flat`` alive until the server has copied it."""
    from sglang.srt.utils import MultiprocessingSerializer

    if flat.is_cuda:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        # handles name the GPU by UUID: the server's processes number their GPUs differently
        monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(
        {"flattened_tensor": flat, "metadata": metadata}, output_str=True)


def server_payloads(handles: Sequence[Optional[str]], plan: Sequence[Sequence[int]]
                    ) -> list[list[str]]:
    """``serialized_named_tensors`` of each server: entry ``r`` is the handle serialized by
    the trainer rank that ``plan`` puts on the GPU of the server's TP rank ``r``.
    ``handles[g]``: what rank ``g`` serialized (None if it holds no copy)."""
    out = []
    for s, ranks in enumerate(plan):
        missing = [g for g in ranks if handles[g] is None]
        if missing:
            raise WeightSyncError(f"server {s}: trainer ranks {missing} sent no handle")
        out.append([handles[g] for g in ranks])
    return out


def _gather_to_rank0(obj, group=None) -> list:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, out, group=group, group_dst=0)
    return out
