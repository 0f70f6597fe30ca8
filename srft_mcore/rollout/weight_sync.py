"""Weight sync: the sharded Megatron policy -> SGLang servers, after every optimizer step.

One collective, three transports (``mode``):

* ``distributed``: a weight-update process group per (PP stage, server), created once
  (NCCL on GPU, gloo on CPU) between the stage's source rank and the server's ranks; each
  bucket is one flattened tensor broadcast into ``/update_weights_from_distributed``.
* ``tensor`` (colocated): each bucket is handed over as a handle, not bytes, through
  ``/update_weights_from_tensor``: CUDA IPC on GPU, POSIX shared memory (torch's
  ``file_system`` sharing strategy) on CPU. The request carries one handle per server TP
  rank, each to a copy of the bucket on that rank's own GPU (see :class:`TensorTransport`).
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
start-up by :func:`check_servers` (see "routes" below): SGLang 0.5.23 loads tensor and
distributed updates only inside a begin/end session, SGLang 0.5.19 has no session routes
and takes pause -> flush -> update -> version -> continue.

Outcomes are agreed on all ranks after steps 1 and 2, so either every rank returns
:class:`SyncStats` or every rank raises :class:`WeightSyncError`; the model is only read,
so a failed sync can simply be called again (a ``distributed`` group that failed is torn
down and created anew on the next call).
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Optional, Sequence

import requests
import torch
import torch.distributed as dist

MODES = ("distributed", "tensor", "disk")
NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A sync failed on some rank or server; the trainer may call sync again.

    ``where``: the (server URL, route) pairs that failed, when known (for the message the
    trainer stops with after the last retry)."""

    def __init__(self, message: str, where: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.where = list(where)


class UnsupportedServer(RuntimeError):
    """A server lacks a route the chosen sync mode needs; found at start-up, before any
    training step. The message is one paragraph: server, version, missing routes, fix."""


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


def _world(group=None) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) without torch.distributed."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ---------------------------------------------------------------------- HTTP helpers
def _post(url: str, path: str, payload: Optional[dict] = None, timeout_s: float = 600.0) -> dict:
    try:
        r = requests.post(url + path, json=payload or {}, timeout=timeout_s)
    except requests.RequestException as e:
        raise WeightSyncError(f"{url}{path}: {type(e).__name__}: {e}", [(url, path)]) from e
    try:
        body = r.json()
    except ValueError:
        body = {"message": r.text[:500]}
    if r.status_code != 200 or (isinstance(body, dict) and body.get("success") is False):
        raise WeightSyncError(f"{url}{path}: HTTP {r.status_code}: "
                              f"{body.get('message', body) if isinstance(body, dict) else body}",
                              [(url, path)])
    return body if isinstance(body, dict) else {"body": body}


def _get(url: str, path: str, timeout_s: float = 30.0) -> dict:
    r = requests.get(url + path, timeout=timeout_s)
    r.raise_for_status()
    return r.json()


def server_weight_version(url: str) -> Optional[str]:
    return _get(url, "/model_info").get("weight_version")


# ---------------------------------------------------------------------- routes
# SGLang's HTTP API differs between releases, and a route that is missing only shows when it
# is first called: after the first training step. So the engine reads each server's routes
# once at start-up and either picks the protocol the server supports or refuses it then.
SESSION_ROUTES = ("/begin_weight_update", "/end_weight_update")
"""The weight-update session. Where a server has it (0.5.23), it loads tensor and distributed
updates only inside an open session; where not (0.5.19), updates go between pause and
continue."""
COMMON_ROUTES = ("/generate", "/model_info", "/pause_generation", "/flush_cache",
                 "/update_weight_version", "/continue_generation")
"""What every sync mode (and the rollouts and version checks) use on every server."""
MODE_ROUTES = {
    "distributed": ("/init_weights_update_group", "/update_weights_from_distributed"),
    # colocated: the engine also releases and resumes the server's memory around training
    "tensor": ("/update_weights_from_tensor", "/release_memory_occupation",
               "/resume_memory_occupation"),
    "disk": ("/update_weights_from_disk",),
}
KNOWN_GOOD = "SGLang 0.5.19 or 0.5.23"
"""Releases whose HTTP servers have every route of every mode (read from their wheels)."""


@dataclass(frozen=True)
class ServerRoutes:
    """The routes one server serves, as far as the sync and the rollouts care."""

    url: str
    paths: frozenset
    version: Optional[str] = None
    """SGLang's version from /server_info (None if the server does not say)."""
    probed: bool = False
    """True: /openapi.json was unavailable and the routes were probed one by one."""

    @property
    def session(self) -> bool:
        """Use the begin/end session: only where both of its routes exist."""
        return all(p in self.paths for p in SESSION_ROUTES)

    def missing(self, mode: str) -> list[str]:
        return [p for p in (*COMMON_ROUTES, *MODE_ROUTES[mode]) if p not in self.paths]

    def describe(self) -> str:
        return f"{self.url} (SGLang {self.version or 'of unknown version'})"


def routes_of_interest() -> list[str]:
    """Every route the sync, in any mode, and the rollouts may use."""
    return [*SESSION_ROUTES, *COMMON_ROUTES, *(p for ps in MODE_ROUTES.values() for p in ps)]


def server_routes(url: str, timeout_s: float = 30.0) -> ServerRoutes:
    """Read the routes ``url`` serves: the ``paths`` of FastAPI's ``/openapi.json`` (SGLang's
    HTTP server is a FastAPI app in every release).

    Fallback, when /openapi.json is unavailable (SGLang's ``DISABLE_OPENAPI_DOC=1``, or a
    proxy in front): an ``OPTIONS`` request per route. Starlette answers 405 for a route that
    exists (none of them allows OPTIONS) and 404 for one that does not, and runs no handler,
    so the probe changes nothing on the server; SGLang's CORS middleware only answers
    OPTIONS itself for browser preflights (with an Origin header), which these are not.
    Network errors propagate (the server does not answer at all)."""
    url = url.rstrip("/")
    version = _server_version(url, timeout_s)
    paths = None
    r = requests.get(url + "/openapi.json", timeout=timeout_s)
    if r.status_code == 200:
        try:
            paths = r.json().get("paths")
        except (ValueError, AttributeError):
            paths = None
    if isinstance(paths, dict):
        return ServerRoutes(url, frozenset(paths), version)
    return ServerRoutes(url, probe_routes(url, routes_of_interest(), timeout_s), version, probed=True)


def probe_routes(url: str, paths: Sequence[str], timeout_s: float = 30.0) -> frozenset:
    """Those of ``paths`` that ``url`` serves, by OPTIONS: anything but 404 counts as served
    (405 from Starlette; a server that answers OPTIONS with something else is given the
    benefit of the doubt, as a missing route then still shows at the first sync)."""
    return frozenset(p for p in paths
                     if requests.options(url + p, timeout=timeout_s).status_code != 404)


def _server_version(url: str, timeout_s: float) -> Optional[str]:
    """SGLang's ``version`` from /server_info (older: /get_server_info); None if neither."""
    for path in ("/server_info", "/get_server_info"):
        try:
            r = requests.get(url + path, timeout=timeout_s)
            if r.status_code == 200:
                version = r.json().get("version")
                if version:
                    return str(version)
        except (requests.RequestException, ValueError, AttributeError):
            pass
    return None


def check_servers(urls: Sequence[str], mode: str,
                  timeout_s: float = 30.0) -> dict[str, ServerRoutes]:
    """The routes of every server in ``urls``; raises :class:`UnsupportedServer` (one
    paragraph for all of them) if one cannot take ``mode``'s sync or does not answer."""
    found: dict[str, ServerRoutes] = {}
    problems = []
    for url in urls:
        try:
            found[url] = server_routes(url, timeout_s)
        except requests.RequestException as e:
            problems.append(f"{url} does not answer ({type(e).__name__}: {e})")
            continue
        routes = found[url]
        missing = routes.missing(mode)
        if missing:
            others = [m for m in MODES if m != mode and not routes.missing(m)]
            how = " (probed with OPTIONS: it serves no /openapi.json)" if routes.probed else ""
            problems.append(
                f"{routes.describe()} does not serve {', '.join(missing)}{how}" +
                (f"; it would take rollout.weight_sync={' or '.join(others)}" if others else ""))
    if problems:
        raise UnsupportedServer(
            f"rollout.weight_sync={mode} cannot update the SGLang servers: "
            f"{'; '.join(problems)}. Nothing was trained. Fix: run {KNOWN_GOOD} "
            f"(requirements/gpu.txt names the image), or choose a sync mode every server "
            f"supports, or list other servers in rollout.urls")
    return found


def begin_update(url: str, session: bool = True) -> None:
    """Pause generation, flush the cache; open a weight-update session (``session``)."""
    _post(url, "/pause_generation", {"mode": "abort"})
    _post(url, "/flush_cache")
    if not session:
        return
    try:
        _post(url, "/begin_weight_update")
    except WeightSyncError as e:
        if "already open" not in str(e):
            raise
        # left open by a failed sync: close it and start over
        _post(url, "/end_weight_update")
        _post(url, "/begin_weight_update")


def end_update(url: str, version: str, session: bool = True) -> None:
    """Close the session (``session``), tag the version, flush (``session``), resume
    generation, verify the version."""
    if session:
        _post(url, "/end_weight_update")
    _post(url, "/update_weight_version", {"new_version": version, "abort_all_requests": False})
    if session:
        _post(url, "/flush_cache")
    _post(url, "/continue_generation")
    got = server_weight_version(url)
    if got != version:
        raise WeightSyncError(f"{url} reports weight version {got!r} after syncing {version!r}",
                              [(url, "/update_weight_version")])


def abandon_update(url: str, session: bool = True) -> None:
    """Best effort after a failure: leave the server closed and generating."""
    for path in (("/end_weight_update",) if session else ()) + ("/continue_generation",):
        try:
            _post(url, path, timeout_s=30.0)
        except Exception:  # noqa: BLE001 - the server may be gone
            pass


# ---------------------------------------------------------------------- buckets
def flatten_bucket(bucket: Sequence[tuple[str, torch.Tensor]]):
    """Bytes of all tensors back to back (largest element size first, so every tensor
    starts aligned), plus (names, dtypes, shapes) in that order."""
    items = sorted(bucket, key=lambda kv: -kv[1].element_size())
    flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in items])
    names = [n for n, _ in items]
    dtypes = [str(t.dtype).removeprefix("torch.") for _, t in items]
    shapes = [list(t.shape) for _, t in items]
    return flat, names, dtypes, shapes


def _bucket_metadata(names, dtypes, shapes):
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


# ---------------------------------------------------------------------- transports
class Transport:
    """How the buckets reach the servers. :meth:`transfer` runs on every rank (step 2);
    ``commit`` on rank 0 after every rank has transferred."""

    mode = ""

    def prepare(self, urls: Sequence[str], src: SourceInfo, version: str, group=None) -> None:
        """Per-rank set-up before the transfer; no collectives (a rank may skip it)."""

    def transfer(self, urls: Sequence[str], src: SourceInfo, tensors: Callable[[], NamedTensors],
                 bucket_bytes: int, version: str, group=None) -> tuple[int, int, Optional[str]]:
        """Step 2 on this rank; returns (bytes sent, buckets sent, error or None); an error
        is ``(text, [(server, route), ...])`` (see :func:`_error`).

        Here: ranks with ``src.exports`` iterate their stage's buckets and the stage's source
        (``src.sends``) sends each one with :meth:`send`."""
        from srft_mcore.models.bridge import bucketize

        sent = buckets = 0
        error = None
        if not src.exports:
            return sent, buckets, error
        for bucket in bucketize(tensors(), bucket_bytes):
            buckets += int(src.sends)
            if src.sends and error is None:
                try:
                    sent += self.send(urls, bucket, version)
                except Exception as e:  # noqa: BLE001 - keep iterating: TP peers gather
                    error = _error(f"rank {src.rank} (pp stage {src.pp_rank}): send", e)
        return sent, buckets, error

    def send(self, urls: Sequence[str], bucket, version: str) -> int:
        raise NotImplementedError

    def commit(self, urls: Sequence[str], version: str) -> None:
        pass

    def failed(self, urls: Sequence[str]) -> None:
        """Forget per-server state after a failure (or a server restart)."""

    def close(self) -> None:
        pass


class DiskTransport(Transport):
    """Buckets become ``model-pp<stage>-<k>.safetensors`` in ``<root>/<version>/``."""

    mode = "disk"

    def __init__(self, root: str, keep: int = 1):
        self.root = root
        self.keep = keep
        self._count = 0
        self._pp_rank = 0

    def version_dir(self, version: str) -> str:
        return os.path.join(self.root, f"weights-{version}")

    def prepare(self, urls, src, version, group=None):
        self._count = 0
        self._pp_rank = src.pp_rank
        os.makedirs(self.version_dir(version), exist_ok=True)

    def send(self, urls, bucket, version):
        from safetensors.torch import save_file

        path = os.path.join(self.version_dir(version),
                            f"model-pp{self._pp_rank:02d}-{self._count:05d}.safetensors")
        self._count += 1
        tensors = {n: t.detach().cpu().contiguous() for n, t in bucket}
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self, urls, version):
        path = self.version_dir(version)
        for url in urls:
            _post(url, "/update_weights_from_disk", {"model_path": path, "flush_cache": False})
        # older snapshots are no longer needed by any server
        old = sorted((d for d in os.listdir(self.root) if d.startswith("weights-")
                      and os.path.join(self.root, d) != path),
                     key=lambda d: os.path.getmtime(os.path.join(self.root, d)))
        for d in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)


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


def colocated_plan(num_servers: int, server_tp: int, world_size: int,
                   on_gpu: bool) -> list[list[int]]:
    """For each server, the trainer rank whose copy of a bucket each of its TP ranks opens.

    Colocated servers run on rank 0's node, server ``s`` on GPUs ``s*T .. s*T+T-1``
    (``--base-gpu-id s*T``), where trainer ranks with the same numbers train: TP rank ``r``
    of server ``s`` reads from trainer rank ``s*T + r``. Shared memory on CPU can be opened
    by any process, so there the ranks simply wrap around the world."""
    wanted = [[s * server_tp + r for r in range(server_tp)] for s in range(num_servers)]
    if not on_gpu:
        return [[g % world_size for g in ranks] for ranks in wanted]
    if num_servers * server_tp > world_size:
        raise WeightSyncError(
            f"colocated tensor mode: {num_servers} servers x server_tp {server_tp} need "
            f"{num_servers * server_tp} GPUs shared with trainer ranks, but the trainer has "
            f"{world_size} ranks. Fix: fewer servers (or a smaller server_tp), or "
            f"rollout.weight_sync=distributed for servers on their own GPUs")
    return wanted


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


def _nbytes(head) -> int:
    _, dtypes, shapes = head
    return sum(int(torch.Size(s).numel()) * getattr(torch, d).itemsize
               for d, s in zip(dtypes, shapes))


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
        full = colocated_plan(len(order), self.server_tp, world, on_gpu)
        return [full[order.index(u)] for u in urls]

    def prepare(self, urls, src, version, group=None):
        rank, world = _world(group)
        on_gpu = torch.cuda.is_available()
        self._plan = self.plan(urls, world, on_gpu)
        if not any(rank in ranks for ranks in self._plan):
            return
        if on_gpu:
            local = int(os.environ.get("LOCAL_RANK", src.rank))
            if local != src.rank:
                raise WeightSyncError(
                    f"colocated tensor mode: trainer rank {src.rank} shares a GPU with a "
                    f"server, but it is not on rank 0's node (LOCAL_RANK={local}), where the "
                    f"servers run. Fix: rollout.weight_sync=distributed")
        else:
            # the default fd-passing strategy needs the receiver to share our authkey
            torch.multiprocessing.set_sharing_strategy("file_system")
            _detach_shm_manager_from_stdio()

    def transfer(self, urls, src, tensors, bucket_bytes, version, group=None):
        from srft_mcore.launching.distributed import broadcast_object

        rank, _ = _world(group)
        holds = any(rank in ranks for ranks in self._plan)
        sent = buckets = 0
        error = None  # once set (on every rank alike), buckets are only iterated
        for flat, head in every_stage_bucket(src, tensors, bucket_bytes, group):
            if error is not None:
                continue
            handle, mine = None, None
            if holds:
                try:
                    handle = serialize_bucket(flat, _bucket_metadata(*head))
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
                        status = _error("rank 0: update_weights_from_tensor", e)
            # until here every rank holds its copy (and its handle): the servers have read it
            error = broadcast_object(status, group)
            del flat, handle, gathered
        if holds and torch.cuda.is_available():
            torch.cuda.ipc_collect()  # blocks the servers have released go back to the pool
        return sent, buckets, error if rank == 0 else None

    def _post(self, urls, payloads) -> None:
        for url, entries in zip(urls, payloads):
            _post(url, "/update_weights_from_tensor",
                  {"serialized_named_tensors": entries, "load_format": "flattened_bucket",
                   "flush_cache": False})


class DistributedTransport(Transport):
    """One process group per (PP stage, server): rank 0 the stage's source, 1.. the server."""

    mode = "distributed"

    def __init__(self, backend: Optional[str] = None, master_address: str = "127.0.0.1",
                 server_tp: int = 1, timeout_s: float = 600.0):
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.server_tp = server_tp
        self.timeout_s = timeout_s
        self._groups: dict = {}     # url -> (group name, process group)
        self._epoch = 0
        self._pp_rank = 0

    def prepare(self, urls, src, version, group=None):
        self._pp_rank = src.pp_rank
        if src.sends:
            for url in urls:
                if url not in self._groups:
                    self._init_group(url)

    def _init_group(self, url: str) -> None:
        from datetime import timedelta

        from sglang.srt.utils.common import init_custom_process_group

        from srft_mcore.launching.distributed import free_port, own_rendezvous_store

        self._epoch += 1
        name = f"srft_wsync_pp{self._pp_rank}_{os.getpid()}_{self._epoch}"
        port = free_port()
        result: dict = {}

        def server_side():
            try:
                _post(url, "/init_weights_update_group", {
                    "master_address": self.master_address, "master_port": port,
                    "rank_offset": 1, "world_size": 1 + self.server_tp, "group_name": name,
                    "backend": self.backend}, timeout_s=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - reported below
                result["error"] = e

        th = threading.Thread(target=server_side, daemon=True)
        th.start()
        with own_rendezvous_store():
            group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{self.master_address}:{port}",
                world_size=1 + self.server_tp, rank=0, group_name=name,
                timeout=timedelta(seconds=self.timeout_s))
        th.join(self.timeout_s)
        if "error" in result or th.is_alive():
            _destroy(group)
            raise WeightSyncError(f"weight-update group with {url} failed: "
                                  f"{result.get('error', 'timed out')}",
                                  [(url, "/init_weights_update_group")])
        self._groups[url] = (name, group)

    def send(self, urls, bucket, version):
        flat, names, dtypes, shapes = flatten_bucket(bucket)
        for url in urls:
            name, group = self._groups[url]
            result: dict = {}

            def server_side():
                try:
                    _post(url, "/update_weights_from_distributed", {
                        "names": names, "dtypes": dtypes, "shapes": shapes,
                        "group_name": name, "load_format": "flattened_bucket",
                        "flush_cache": False}, timeout_s=self.timeout_s)
                except Exception as e:  # noqa: BLE001 - reported below
                    result["error"] = e

            th = threading.Thread(target=server_side, daemon=True)
            th.start()
            dist.broadcast(flat, group=group, group_src=0)
            th.join(self.timeout_s)
            if "error" in result or th.is_alive():
                raise WeightSyncError(f"distributed update of {url} failed: "
                                      f"{result.get('error', 'timed out')}",
                                      [(url, "/update_weights_from_distributed")])
        return flat.numel()

    def failed(self, urls):
        for url in urls:
            entry = self._groups.pop(url, None)
            if entry is None:
                continue
            name, group = entry
            try:
                _post(url, "/destroy_weights_update_group", {"group_name": name}, timeout_s=10)
            except Exception:  # noqa: BLE001 - a restarted server no longer has it
                pass
            _destroy(group)

    def close(self):
        self.failed(list(self._groups))


def _destroy(group) -> None:
    try:
        dist.destroy_process_group(group)
    except Exception:  # noqa: BLE001
        pass


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
def _error(prefix: str, e: BaseException) -> tuple[str, list]:
    """A rank's failure as the ranks agree on it: text, and the (server, route) pairs
    that failed when the exception names them."""
    return f"{prefix}: {e}", list(getattr(e, "where", []))


def _agree(error: Optional[tuple], extra=None, group=None) -> tuple[list[tuple], list]:
    """All ranks exchange (error, extra); returns every rank's errors and extras."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return ([error] if error else []), [extra]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, (error, extra), group=group)
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
    weight-update session (:attr:`ServerRoutes.session`); None: every server.
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
            error = _error("rank 0: begin", e)
    if not error:
        try:
            transport.prepare(urls, src, version, group=group)
        except Exception as e:  # noqa: BLE001
            error = _error(f"rank {src.rank}: prepare {transport.mode}", e)
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
            error = _error("rank 0: commit/verify", e)
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

