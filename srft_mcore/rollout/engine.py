"""The rollout engine the trainer talks to: servers + client + weight sync + fault recovery.

Usage (every trainer rank runs the same calls; they are collective)::

    engine = RolloutEngine.launch(cfg.rollout, model_path=hf_dir, layout=layout,
                                  hf_config=hf, work_dir=run_dir)
    for step in range(steps):
        groups = engine.generate(prompts, n=cfg.rollout.n_samples,
                                 sampling=SamplingParams(temperature=1.0, max_new_tokens=256))
        ...                                   # rank 0 gets the completions (see broadcast)
        optimizer.step()
        engine.sync_weights(model_chunks, version=str(step + 1))
    engine.shutdown()

Rank 0 owns the servers (launched here, or attached through ``rollout.urls``) and does the
HTTP; the other ranks take part in the weight sync (each PP stage's source rank sends its
own layers) and in the recovery protocol of :meth:`generate`: when a server dies or hangs
(requests fail, then ``/health_generate`` does not answer), rank 0 restarts it, every rank
re-syncs the current weights into it, and the request batch is retried. ``metrics()``
counts the restarts.

With a router (``rollout.router``: an sglang-router launched on rank 0 in front of the
servers; ``rollout.router_url``: one running elsewhere, the servers behind it listed in
``rollout.urls``) /generate goes through the router, while the weight sync and the memory
requests go to every server directly. A request that fails through the router does not name
a server, so recovery then checks all of them (and restarts a launched router that exited).

Servers on other nodes dial the trainer for the distributed weight sync: at the address
:func:`resolve_sync_address` gives (``rollout.sync_address`` / ``SRFT_SYNC_ADDR``).

At construction rank 0 reads the routes every server serves
(:func:`~srft_mcore.rollout.server_routes.check_servers`): a server that cannot take the sync
mode is refused there (:class:`~srft_mcore.rollout.errors.UnsupportedServer`), before
any training step, and each server gets the protocol it supports (the begin/end weight-update
session where it has one). A sync that fails is retried ``sync_retries`` times (restarting
dead servers in between) before :class:`WeightSyncError` reaches the caller.

Colocated (``rollout.weight_sync=tensor``: servers on the trainer's GPUs) the trainer
brackets each training step: ``engine.before_train()`` makes every server free its weights,
KV cache and CUDA graphs; the next ``engine.sync_weights(...)`` brings the weights' memory
back, pushes the new weights into it, then brings back the KV cache and CUDA graphs, so the
trainer's and the server's peaks never add up.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Optional, Sequence

from srft_mcore.config import sglang_mem_fraction
from srft_mcore.launching.distributed import all_gather_objects, broadcast_object
from srft_mcore.rollout.client import Completion, GenerateError, Prompt, SamplingParams, SGLangClient
from srft_mcore.rollout.errors import RolloutError, WeightSyncError
from srft_mcore.rollout.recovery import ServerRecovery
from srft_mcore.rollout.router import SGLangRouter, router_for
from srft_mcore.rollout.server import SGLangServer, cuda_available
from srft_mcore.rollout.server_memory import MEMORY_TAGS, ServerMemory
from srft_mcore.rollout.server_routes import ServerRoutes, check_routes
from srft_mcore.rollout.sync_address import resolve_sync_address
from srft_mcore.rollout.sync_types import (NamedTensors, SourceInfo, SyncStats, rank_and_size,
                                           resolve_mode, source_info)
from srft_mcore.rollout.weight_sync import export_stream, make_transport, sync_weights


class RolloutEngine:
    """SGLang servers behind one collective interface: generate, sync_weights, shutdown."""

    def __init__(self, servers: Sequence[SGLangServer], mode: str = "distributed",
                 layout=None, hf_config: Optional[dict] = None, bucket_mb: float = 256,
                 work_dir: Optional[str] = None, request_timeout_s: float = 600.0,
                 max_concurrency: int = 64, retries: int = 2, max_recoveries: int = 2,
                 health_timeout_s: float = 60.0, server_tp: int = 1, group=None,
                 router: Optional[SGLangRouter] = None, sync_address: Optional[str] = None,
                 sync_retries: int = 2, sync_retry_wait_s: float = 2.0,
                 owners: Optional[dict] = None, reattach_timeout_s: float = 0.0):
        self.servers = list(servers)
        self.router = router
        """Where /generate goes instead of the servers (rank 0's object owns a launched one)."""
        self.mode = resolve_mode(mode)
        self.layout = layout
        self.hf_config = hf_config
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="srft_rollout_")
        self.group = group
        self.max_recoveries = max_recoveries
        rank = rank_and_size(group)[0]
        owners = owners or {}
        self.recovery = ServerRecovery(
            self.servers, router, health_timeout_s,
            mine={s.url for s in self.servers
                  if owners.get(s.url, 0 if s.owned else None) == rank
                  or (rank == 0 and owners.get(s.url) is None)},
            reattach_timeout_s=reattach_timeout_s)
        """This rank's restart policy for the servers it launched (rank 0: also those
        attached by URL, and the router)."""
        if router is not None:  # one URL: the router balances, up to the same total in flight
            self.client = SGLangClient([router.url], max_concurrency=max_concurrency * max(
                1, len(self.servers)), request_timeout_s=request_timeout_s, retries=retries)
        else:
            self.client = SGLangClient(self.urls, max_concurrency=max_concurrency,
                                       request_timeout_s=request_timeout_s, retries=retries)
        self.sync_address = (resolve_sync_address(sync_address, self.urls)
                             if self.mode == "distributed" else None)
        """The address the servers dial for this rank's weight-update groups."""
        self.transport = make_transport(self.mode, self.work_dir, server_tp=server_tp,
                                        master_address=self.sync_address or "127.0.0.1",
                                        placement=self.urls)
        self.sync_retries = sync_retries
        self.sync_retry_wait_s = sync_retry_wait_s
        self.routes: dict[str, ServerRoutes] = self._check_routes()
        """Each server's routes, read once here (a restarted server runs the same SGLang)."""
        self.version: Optional[str] = None
        self.last_sync: Optional[SyncStats] = None
        self._tensors: Optional[Callable[[], NamedTensors]] = None
        self.memory = ServerMemory(self.urls, group)
        """What the servers have released of their GPU memory (colocated)."""
        self._weights_dropped = False  # released weights come back empty: sync before use
        self._sync_failed = False
        self._syncs = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def launch(cls, cfg, model_path: Optional[str] = None, layout=None,
               hf_config: Optional[dict] = None, work_dir: Optional[str] = None,
               server_args: Sequence[str] = (), group=None, **kwargs) -> "RolloutEngine":
        """Launch ``cfg.num_servers`` servers for ``model_path`` on rank 0 (or attach to
        ``cfg.urls``), and the router ``cfg`` asks for (launched on rank 0, or attached to
        ``cfg.router_url``); every rank gets the URLs. ``cfg`` is a ``RolloutConfig``."""
        servers, router, owners = start_servers(cfg, model_path, work_dir, server_args, group)
        try:
            return cls(servers, mode=cfg.weight_sync, layout=layout, hf_config=hf_config,
                       owners=owners, reattach_timeout_s=cfg.reattach_timeout_s,
                       bucket_mb=cfg.bucket_mb, work_dir=work_dir,
                       request_timeout_s=cfg.request_timeout_s,
                       max_concurrency=cfg.max_concurrency, server_tp=cfg.server_tp,
                       group=group, router=router, sync_address=cfg.sync_address, **kwargs)
        except BaseException:  # e.g. UnsupportedServer: stop what was launched for nothing
            _stop_owned(([router] if router is not None else []) + servers)
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def rank(self) -> int:
        return rank_and_size(self.group)[0]

    @property
    def colocated(self) -> bool:
        """The servers share the trainer's GPUs (the ``tensor`` mode)."""
        return self.mode == "tensor"

    @property
    def health_timeout_s(self) -> float:
        """How long a server that failed a request may take to answer /health_generate
        before it counts as hung (and is restarted)."""
        return self.recovery.health_timeout_s

    @health_timeout_s.setter
    def health_timeout_s(self, value: float) -> None:
        self.recovery.health_timeout_s = value

    @property
    def released(self) -> dict[str, list[str]]:
        """The memory tags each server has released (empty when all is resident)."""
        return self.memory.released

    @property
    def memory_calls(self) -> int:
        """Release/resume requests rank 0 made (all servers together)."""
        return self.memory.calls

    def _check_routes(self) -> dict[str, ServerRoutes]:
        routes = check_routes(self.urls, self.mode, self.group)
        if self.rank == 0:
            for r in routes.values():
                print(f"[srft] weight sync to {r.describe()}: {self.mode}, "
                      + ("begin/end weight-update session" if r.session else
                         "pause -> flush -> update -> version -> continue (no session routes)"),
                      flush=True)
        return routes

    @property
    def sessions(self) -> list[str]:
        """The servers that get the begin/end weight-update session."""
        return [u for u in self.urls if u in self.routes and self.routes[u].session]

    def _source(self) -> SourceInfo:
        if self.layout is not None:
            return source_info(self.layout)
        return SourceInfo(rank=self.rank, pp_rank=0, exports=True, sends=self.rank == 0)

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self, model_chunks, version: Optional[str] = None) -> SyncStats:
        """Push the current policy weights to every server (collective over all ranks).

        ``model_chunks``: this rank's GPTModel (or list of chunks). Raises
        :class:`WeightSyncError` on every rank when any part failed; call again to retry.
        """
        if self.hf_config is None:
            raise ValueError("RolloutEngine needs hf_config to export Megatron weights")
        src = self._source()
        return self.sync_tensors(lambda: export_stream(model_chunks, self.hf_config, src),
                                 version)

    def sync_tensors(self, tensors: Callable[[], NamedTensors],
                     version: Optional[str] = None) -> SyncStats:
        """Like :meth:`sync_weights` for any stream of ``(hf_name, tensor)`` per rank."""
        version = version if version is not None else str(self._syncs + 1)
        self._tensors = tensors
        attempts = self.sync_retries + 1
        for attempt in range(1, attempts + 1):
            self._restart_dead()
            # after before_train(): the weights' memory first, so the update has somewhere to
            # go, and the KV cache only once the buckets are freed (peak = weights + 1 bucket)
            self.memory.resume(["weights"])
            self._sync_failed = True  # until a sync succeeds, no rollout may use the servers
            try:
                stats = self._sync(self.urls, version)
                break
            except WeightSyncError as e:  # agreed on every rank: all retry or all raise
                if attempt == attempts:
                    raise WeightSyncError(f"{e} (attempt {attempt} of {attempts})",
                                          e.where) from e
                if self.rank == 0:
                    print(f"[srft] weight sync attempt {attempt} of {attempts} failed, "
                          f"retrying in {self.sync_retry_wait_s:g} s: {e}", flush=True)
                    # the other ranks wait for this at the retry's first collective
                    self.recovery.wait_for_attached([url for url, _ in e.where])
                time.sleep(self.sync_retry_wait_s)
        self._sync_failed = False
        self._weights_dropped = False
        self.version = version
        self.memory.resume(MEMORY_TAGS)
        return stats

    def _restart_dead(self) -> None:
        """Collective: each rank restarts the servers it launched that died since the last
        call (rank 0 also a launched router that exited)."""
        # process liveness only: an HTTP health probe costs ~1 s per step on CPU, and
        # a hung server is caught by the request timeouts of generate and sync
        self._restarted(self._on_owners(self.recovery.restart_dead))

    def _on_owners(self, fn: Callable[[], list[str]]) -> list[str]:
        """Collective: ``fn`` on every rank (each restarts what it owns); the restarted URLs
        of all ranks in server order, or RolloutError on every rank if any rank failed."""
        try:
            mine = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - every rank raises below
            mine = ("error", f"rank {self.rank}: {type(e).__name__}: {e}")
        results = all_gather_objects(mine, self.group)
        errors = [text for status, text in results if status == "error"]
        if errors:
            raise RolloutError("; ".join(errors))
        restarted = {u for status, urls in results for u in urls}
        return [u for u in self.urls if u in restarted]

    def _restarted(self, urls: Sequence[str]) -> None:
        """A restarted server starts with nothing released and no weight-update state."""
        self.memory.forget(urls)
        self.transport.failed(urls)

    def _sync(self, urls: Sequence[str], version: str) -> SyncStats:
        src = self._source()
        stats = sync_weights(self.transport, urls, src, version, self._tensors,
                             self.bucket_bytes, group=self.group, sessions=self.sessions)
        self._syncs += 1
        self.last_sync = stats
        return stats

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: Optional[SamplingParams] = None, return_logprob: bool = True,
                 broadcast: bool = False) -> Optional[list[list[Completion]]]:
        """``n`` samples per prompt; collective. Rank 0 (every rank with ``broadcast``)
        gets one list of :class:`Completion` per prompt; the others get None."""
        if self._sync_failed:
            raise RolloutError("the last weight sync failed, so the servers may hold partly "
                               "updated weights: call sync_weights again before generating")
        if self._weights_dropped:
            raise RolloutError("before_train() released the servers' weights: call "
                               "sync_weights before generating")
        self.memory.resume(MEMORY_TAGS)
        rank = self.rank
        for attempt in range(self.max_recoveries + 1):
            status, out = ("ok", None), None
            if rank == 0:
                try:
                    out = self.client.generate(prompts, n=n, sampling=sampling,
                                               return_logprob=return_logprob)
                    self._check_versions(out)
                except GenerateError as e:
                    try:  # which servers to check (all of them after a router failure)
                        status = ("failed", self.recovery.suspects(e.failed_urls))
                    except Exception as e2:  # noqa: BLE001 - every rank raises below
                        status = ("error", f"{e}; recovery failed: {e2}")
                except Exception as e:  # noqa: BLE001
                    status = ("error", f"{type(e).__name__}: {e}")
            status = broadcast_object(status, self.group)
            if status[0] == "ok":
                return broadcast_object(out, self.group) if broadcast else out
            if status[0] == "error":
                raise RolloutError(status[1])
            # each server's launcher checks it and restarts it if it is dead or hung
            restarted = self._on_owners(lambda: self.recovery.recover(status[1]))
            self._restarted(restarted)
            if restarted and self._tensors is not None:
                self._sync(restarted, self.version)
        raise RolloutError(f"generation still failing after {self.max_recoveries} recoveries")

    def _check_versions(self, groups: list[list[Completion]]) -> None:
        if self.version is None:
            return
        bad = {c.weight_version for g in groups for c in g} - {self.version}
        if bad:
            raise RolloutError(f"completions carry weight versions {sorted(bad)}, expected "
                               f"{self.version!r}: a server serves stale weights")

    # ------------------------------------------------------------------ memory (colocated)
    def before_train(self) -> None:
        """Collective; call before each training step. Colocated: every server frees its
        weights, KV cache and CUDA graphs (SGLang's ``/release_memory_occupation``) so that
        training has the GPUs' memory. :meth:`sync_weights` brings it all back (weights,
        then the KV cache and CUDA graphs) and must come before the next :meth:`generate`.
        A no-op for servers on their own GPUs and when already released.

        On CPU the servers free nothing, but the calls are made all the same."""
        if not self.colocated:
            return
        self.memory.release(MEMORY_TAGS)
        self._weights_dropped = True

    def after_train(self) -> None:
        """Collective: bring back whatever :meth:`before_train` released and
        :meth:`sync_weights` has not (a no-op after a sync). The weights' contents are only
        valid again after a sync."""
        self.memory.resume(MEMORY_TAGS)

    # ------------------------------------------------------------------ metrics, shutdown
    def metrics(self) -> dict:
        out = {"rollout/server_restarts": sum(s.restarts for s in self.servers),
               "rollout/weight_syncs": self._syncs}
        if self.router is not None and self.router.owned:
            out["rollout/router_restarts"] = self.router.restarts
        if self.colocated:
            out["rollout/memory_requests"] = self.memory_calls
        if self.last_sync is not None:
            out.update({"rollout/sync_s": self.last_sync.seconds,
                        "rollout/sync_gb_per_s": self.last_sync.gb_per_s})
        return out

    def shutdown(self) -> None:
        try:
            self.transport.close()
        finally:
            if self.router is not None and self.router.owned:
                self.router.stop()
            for s in self.servers:
                if s.owned:
                    s.stop()

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_servers(cfg, model_path: Optional[str], work_dir: Optional[str],
                  server_args: Sequence[str], group=None
                  ) -> tuple[list[SGLangServer], Optional[SGLangRouter], dict]:
    """Collective: launch (or attach to) the servers and the router of
    :meth:`RolloutEngine.launch`; every rank gets every URL, in server order, and raises when
    a launch failed. Returns (servers, router, owners): ``owners[url]`` is the rank that
    launched the server (it restarts it), None for one attached by URL.

    Rank 0 launches them, except colocated servers (``weight_sync=tensor``) of a trainer on
    several nodes: each node's first rank launches its node's share on its own GPUs
    (:func:`~srft_mcore.rollout.tensor_transport.servers_of_node`), listening on the node's
    address; the router, if any, runs on rank 0."""
    from srft_mcore.rollout.tensor_transport import ranks_per_node, servers_of_node

    rank, world = rank_and_size(group)
    colocated = resolve_mode(cfg.weight_sync) == "tensor"
    if colocated and cuda_available():
        # colocated: before_train() needs SGLang's memory saver
        server_args = [*server_args, "--enable-memory-saver"]
    per_node = ranks_per_node(world)
    nodes = world // per_node
    every_node = colocated and not cfg.urls and nodes > 1
    launcher = rank % per_node == 0 if every_node else rank == 0
    servers: list[SGLangServer] = []
    error = None
    if launcher:
        try:
            if every_node:
                host = resolve_sync_address(None, [_master_url()])
                share = servers_of_node(cfg.num_servers, nodes, rank // per_node)
                servers = launch_servers(cfg, model_path, work_dir, server_args, share, host)
                print(f"[srft] node {rank // per_node} (rank {rank}): colocated servers "
                      f"{share} at {' '.join(s.url for s in servers)}", flush=True)
            else:
                servers = launch_servers(cfg, model_path, work_dir, server_args)
        except Exception as e:  # noqa: BLE001 - every rank raises below
            error = e
            _stop_owned(servers)
            servers = []
    mine = (error is None, [s.url for s in servers], [s.owned for s in servers])
    launched = all_gather_objects(mine, group)
    router = None
    if all(ok for ok, _, _ in launched) and rank == 0:
        try:
            router = router_for(cfg, [u for _, urls, _ in launched for u in urls], work_dir)
        except Exception as e:  # noqa: BLE001
            error = e
    router_url = broadcast_object(("ok", router.url if router else None) if error is None
                                  else ("error", f"{type(error).__name__}: {error}"), group)
    if not all(ok for ok, _, _ in launched) or router_url[0] == "error":
        _stop_owned(servers)
        if error is not None:
            raise error
        failed = [r for r, (ok, _, _) in enumerate(launched) if not ok]
        raise RolloutError(f"rank {failed[0] if failed else 0} failed to start SGLang"
                           + (f": {router_url[1]}" if router_url[0] == "error" else ""))
    owners, ordered = {}, []
    for r, (_, urls, owned) in enumerate(launched):
        for url, own in zip(urls, owned):
            owners[url] = r if own else None
            ordered.append(next((s for s in servers if s.url == url), None) if r == rank
                           else SGLangServer.attach(url))
    if rank != 0:
        router = SGLangRouter.attach(router_url[1]) if router_url[1] else None
    return ordered, router, owners


def _master_url() -> str:
    """torchrun's rendezvous host as a URL (whose route tells this node's own address)."""
    return f"http://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:" \
           f"{os.environ.get('MASTER_PORT', '29500')}"


def _stop_owned(servers) -> None:
    for s in servers:
        if s.owned:
            s.stop()


def server_gpu_env(index: int, tp: int, num_servers: int) -> dict:
    """CUDA_VISIBLE_DEVICES of server ``index`` when SRFT_ROLLOUT_GPUS lists the rollout GPUs
    (e.g. "4,5,6,7": two TP2 servers on GPUs 4-5 and 6-7); empty otherwise."""
    listed = os.environ.get("SRFT_ROLLOUT_GPUS", "").strip()
    if not listed:
        return {}
    gpus = [g for g in listed.split(",") if g]
    if len(gpus) < tp * num_servers:
        raise RolloutError(f"SRFT_ROLLOUT_GPUS={listed!r} lists {len(gpus)} GPUs; "
                           f"{num_servers} servers x server_tp {tp} need {tp * num_servers}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[index * tp:(index + 1) * tp])}


def colocated_gpu_args(cfg, index: int) -> list[str]:
    """Colocated GPU servers side by side: the node's server ``index`` starts at GPU
    ``index*tp``, the GPUs of the node's trainer ranks ``index*tp ..`` (what the tensor
    mode's handles assume); unless SRFT_ROLLOUT_GPUS places the servers."""
    if (resolve_mode(cfg.weight_sync) != "tensor" or not cuda_available()
            or os.environ.get("SRFT_ROLLOUT_GPUS", "").strip()):
        return []
    return ["--base-gpu-id", str(index * cfg.server_tp)]


def launch_servers(cfg, model_path: Optional[str], work_dir: Optional[str] = None,
                   server_args: Sequence[str] = (), indices: Optional[Sequence[int]] = None,
                   host: str = "127.0.0.1") -> list[SGLangServer]:
    """Attach to ``cfg.urls`` or start servers ``indices`` (default: all ``cfg.num_servers``)
    of this node in parallel, listening on ``host``."""
    if cfg.urls:
        servers = [SGLangServer.attach(u) for u in cfg.urls]
        down = [s.url for s in servers if not s.healthy(timeout_s=10.0)]
        if down:
            raise RolloutError(f"rollout.urls: {down} do not answer /health")
        return servers
    if model_path is None:
        raise ValueError("launching SGLang needs model_path (or set rollout.urls)")
    log_dir = work_dir or tempfile.mkdtemp(prefix="srft_rollout_")
    os.makedirs(log_dir, exist_ok=True)
    indices = list(range(cfg.num_servers)) if indices is None else list(indices)
    servers = [SGLangServer(model_path, tp=cfg.server_tp, host=host,
                            extra_args=[*server_args, *colocated_gpu_args(cfg, local)],
                            env=server_gpu_env(i, cfg.server_tp, cfg.num_servers),
                            log_path=os.path.join(log_dir, f"sglang-{i}.log"),
                            startup_timeout_s=cfg.startup_timeout_s,
                            mem_fraction=sglang_mem_fraction(
                                cfg.mem_fraction, resolve_mode(cfg.weight_sync) == "tensor"))
               for local, i in enumerate(indices)]
    try:
        for s in servers:
            s.start()
        deadline = time.monotonic() + cfg.startup_timeout_s
        for s in servers:
            s.wait_healthy(max(1.0, deadline - time.monotonic()))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
