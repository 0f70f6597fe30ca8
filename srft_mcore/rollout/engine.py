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

At construction rank 0 reads the routes every server serves (:func:`check_servers`): a
server that cannot take the sync mode is refused there (:class:`UnsupportedServer`), before
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

import ipaddress
import os
import socket
import tempfile
import time
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import requests
import torch

from srft_mcore.config import sglang_mem_fraction
from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.rollout.client import Completion, GenerateError, Prompt, SamplingParams, SGLangClient
from srft_mcore.rollout.router import SGLangRouter, router_for
from srft_mcore.rollout.server import SGLangServer, cuda_available
from srft_mcore.rollout.weight_sync import (MODES, NamedTensors, ServerRoutes, SourceInfo,
                                            SyncStats, UnsupportedServer, WeightSyncError,
                                            _world, check_servers, export_stream,
                                            make_transport, source_info, sync_weights)


MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""What ``/release_memory_occupation`` frees on a GPU server (SGLang's memory-saver tags)."""


class RolloutError(RuntimeError):
    """Generation failed and could not be recovered (e.g. an attached server is down)."""


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``distributed`` (works on GPU and CPU; ``tensor`` needs colocation and
    ``disk`` a shared file system, so both are chosen explicitly)."""
    if mode == "auto":
        return "distributed"
    if mode not in MODES:
        raise ValueError(f"rollout.weight_sync={mode!r}: expected auto or one of {MODES}")
    return mode


class RolloutEngine:
    """SGLang servers behind one collective interface: generate, sync_weights, shutdown."""

    def __init__(self, servers: Sequence[SGLangServer], mode: str = "distributed",
                 layout=None, hf_config: Optional[dict] = None, bucket_mb: float = 256,
                 work_dir: Optional[str] = None, request_timeout_s: float = 600.0,
                 max_concurrency: int = 64, retries: int = 2, max_recoveries: int = 2,
                 health_timeout_s: float = 60.0, server_tp: int = 1, group=None,
                 router: Optional[SGLangRouter] = None, sync_address: Optional[str] = None,
                 sync_retries: int = 2, sync_retry_wait_s: float = 2.0):
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
        self.health_timeout_s = health_timeout_s
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
        self._released: dict[str, set] = {}  # url -> memory tags it has released
        self._weights_dropped = False  # released weights come back empty: sync before use
        self.memory_calls = 0  # release/resume requests rank 0 made (all servers together)
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
        rank, _ = _world(group)
        if resolve_mode(cfg.weight_sync) == "tensor" and cuda_available():
            # colocated: before_train() needs SGLang's memory saver
            server_args = [*server_args, "--enable-memory-saver"]
        servers: list[SGLangServer] = []
        router = None
        error = None
        if rank == 0:
            try:
                servers = launch_servers(cfg, model_path, work_dir, server_args)
                router = router_for(cfg, [s.url for s in servers], work_dir)
            except Exception as e:  # noqa: BLE001 - every rank raises below
                error = e
                for s in servers:
                    if s.owned:
                        s.stop()
        info = broadcast_object(None if error else ([s.url for s in servers],
                                                    router.url if router else None), group)
        if info is None:
            raise error if error is not None else RolloutError("rank 0 failed to start SGLang")
        urls, router_url = info
        if rank != 0:
            servers = [SGLangServer.attach(u) for u in urls]
            router = SGLangRouter.attach(router_url) if router_url else None
        try:
            return cls(servers, mode=cfg.weight_sync, layout=layout, hf_config=hf_config,
                       bucket_mb=cfg.bucket_mb, work_dir=work_dir,
                       request_timeout_s=cfg.request_timeout_s,
                       max_concurrency=cfg.max_concurrency, server_tp=cfg.server_tp,
                       group=group, router=router, sync_address=cfg.sync_address, **kwargs)
        except BaseException:  # e.g. UnsupportedServer: stop what was launched for nothing
            for proc in ([router] if router is not None else []) + servers:
                if proc.owned:
                    proc.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def rank(self) -> int:
        return _world(self.group)[0]

    @property
    def colocated(self) -> bool:
        """The servers share the trainer's GPUs (the ``tensor`` mode)."""
        return self.mode == "tensor"

    @property
    def released(self) -> dict[str, list[str]]:
        """The memory tags each server has released (empty when all is resident)."""
        return {u: sorted(t) for u, t in self._released.items() if t}

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
            self._resume(["weights"])
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
                time.sleep(self.sync_retry_wait_s)
        self._sync_failed = False
        self._weights_dropped = False
        self.version = version
        self._resume(MEMORY_TAGS)
        return stats

    def _restart_dead(self) -> None:
        """Collective: rank 0 restarts owned servers that died since the last call."""
        status = ("ok", [])
        if self.rank == 0:
            try:
                # process liveness only: an HTTP health probe costs ~1 s per step on CPU, and
                # a hung server is caught by the request timeouts of generate and sync
                dead = [s.url for s in self.servers if s.owned and not s.is_alive()]
                self._restart_router_if_dead(probe_attached=False)
                status = ("ok", self._recover(dead) if dead else [])
            except Exception as e:  # noqa: BLE001 - every rank raises below
                status = ("error", f"{type(e).__name__}: {e}")
        status = broadcast_object(status, self.group)
        if status[0] == "error":
            raise RolloutError(status[1])
        self._restarted(status[1])

    def _restarted(self, urls: Sequence[str]) -> None:
        """A restarted server starts with nothing released and no weight-update state."""
        for url in urls:
            self._released.pop(url, None)
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
        self._resume(MEMORY_TAGS)
        rank = self.rank
        for attempt in range(self.max_recoveries + 1):
            status, out = ("ok", None), None
            if rank == 0:
                try:
                    out = self.client.generate(prompts, n=n, sampling=sampling,
                                               return_logprob=return_logprob)
                    self._check_versions(out)
                except GenerateError as e:
                    try:
                        status = ("restarted", self._recover(e.failed_urls))
                    except Exception as e2:  # noqa: BLE001 - every rank raises below
                        status = ("error", f"{e}; recovery failed: {e2}")
                except Exception as e:  # noqa: BLE001
                    status = ("error", f"{type(e).__name__}: {e}")
            status = broadcast_object(status, self.group)
            if status[0] == "ok":
                return broadcast_object(out, self.group) if broadcast else out
            if status[0] == "error":
                raise RolloutError(status[1])
            restarted = status[1]
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

    def _responsive(self, server: SGLangServer) -> bool:
        try:
            r = requests.get(server.url + "/health_generate", timeout=self.health_timeout_s)
            return r.status_code == 200
        except requests.RequestException:
            return False

    def _restart_router_if_dead(self, probe_attached: bool = True) -> bool:
        """Rank 0: restart a launched router whose process has exited; an attached one that
        does not answer /health (probed only with ``probe_attached``) is an error: it is not
        ours to restart."""
        router = self.router
        if router is None:
            return False
        if router.owned:
            if router.proc is not None and router.is_alive():
                return False
            router.restart()
            return True
        if probe_attached and not router.healthy(timeout_s=self.health_timeout_s):
            raise RolloutError(f"the router {router.url} does not answer /health and was "
                               f"attached (rollout.router_url), not launched here: restart it "
                               f"yourself")
        return False

    def _recover(self, failed_urls: Sequence[str]) -> list[str]:
        """Rank 0: restart the failed servers that are dead or hung; return their URLs.
        A failure through the router does not say which server failed: the router is
        checked (restarted if it was launched here and has exited), then every server."""
        via_router = self.router is not None and self.router.url in failed_urls
        if via_router:
            self._restart_router_if_dead()
            failed_urls = self.urls
        restarted = []
        for server in self.servers:
            if server.url not in failed_urls:
                continue
            if server.is_alive() and self._responsive(server):
                continue  # a transient failure: just retry
            if not server.owned:
                raise RolloutError(f"server {server.url} does not answer and was attached "
                                   f"(rollout.urls), not launched here: restart it yourself")
            server.restart()
            restarted.append(server.url)
        return restarted

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
        self._memory_op("/release_memory_occupation", self._todo(MEMORY_TAGS, released=False))
        self._weights_dropped = True

    def after_train(self) -> None:
        """Collective: bring back whatever :meth:`before_train` released and
        :meth:`sync_weights` has not (a no-op after a sync). The weights' contents are only
        valid again after a sync."""
        self._resume(MEMORY_TAGS)

    def _todo(self, tags: Sequence[str], released: bool) -> dict[str, list[str]]:
        """Per server, the ``tags`` that are (``released``) or are not released."""
        out = {}
        for url in self.urls:
            have = self._released.get(url, set())
            todo = [t for t in tags if (t in have) == released]
            if todo:
                out[url] = todo
        return out

    def _resume(self, tags: Sequence[str]) -> None:
        todo = self._todo(tags, released=True)
        if todo and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached blocks are what the server maps
        self._memory_op("/resume_memory_occupation", todo)

    def _memory_op(self, path: str, todo: dict[str, list[str]]) -> None:
        """Rank 0 posts ``path`` with each server's tags; every rank records the outcome."""
        if not todo:
            return
        status = None
        if self.rank == 0:
            try:
                for url, tags in todo.items():
                    _control(url, path, {"tags": tags})
                    self.memory_calls += 1
            except Exception as e:  # noqa: BLE001 - every rank raises below
                status = f"{type(e).__name__}: {e}"
        status = broadcast_object(status, self.group)
        if status is not None:
            raise RolloutError(status)
        for url, tags in todo.items():
            have = self._released.setdefault(url, set())
            if path == "/release_memory_occupation":
                have.update(tags)
            else:
                have.difference_update(tags)

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


def check_routes(urls: Sequence[str], mode: str, group=None) -> dict[str, ServerRoutes]:
    """Collective: rank 0 reads the routes of every server in ``urls``
    (:func:`~srft_mcore.rollout.weight_sync.check_servers`); every rank gets them, or every
    rank raises :class:`UnsupportedServer` alike when one cannot take ``mode``'s sync."""
    found, error = {}, None
    if _world(group)[0] == 0:
        try:
            found = check_servers(urls, resolve_mode(mode))
        except UnsupportedServer as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - every rank raises below
            error = f"reading the routes of the SGLang servers {list(urls)} failed: " \
                    f"{type(e).__name__}: {e}"
    found, error = broadcast_object((found, error), group)
    if error is not None:
        raise UnsupportedServer(error)
    return found


def check_attached_servers(cfg, group=None) -> None:
    """Collective, for the trainer's start-up before any heavy work: refuse servers given by
    URL (``rollout.urls``, a ``RolloutConfig``) that cannot take the sync mode. Servers
    launched here are checked once they are up, by the engine."""
    if cfg.urls:
        check_routes([u.rstrip("/") for u in cfg.urls], cfg.weight_sync, group)


def _is_loopback(host: Optional[str]) -> bool:
    """``host`` names this machine's loopback interface (a literal address or localhost)."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_sync_address(value: Optional[str], urls: Sequence[str]) -> str:
    """The address of this node that the servers ``urls`` dial for the distributed weight
    sync (``rollout.sync_address``; see :mod:`srft_mcore.config`). The environment variable
    SRFT_SYNC_ADDR wins (one value per node); null means 127.0.0.1 when every server is on
    loopback, else ``auto``; ``auto`` is the address of the interface this node reaches the
    first remote server through (no packet is sent), else its host name's address."""
    env = os.environ.get("SRFT_SYNC_ADDR", "").strip()
    if env:
        return env
    hosts = [(urlparse(u).hostname, urlparse(u).port or 80) for u in urls]
    remote = [(h, p) for h, p in hosts if not _is_loopback(h)]
    if value is None:
        if not remote:
            return "127.0.0.1"
        value = "auto"
    if value != "auto":
        return value
    if not remote:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(remote[0])  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _control(url: str, path: str, payload: dict, idle_wait_s: float = 10.0) -> None:
    """POST a memory request. SGLang refuses a release until its scheduler has noticed that
    the last batch is done (it asserts "only when server is idle"); that is retried."""
    deadline = time.monotonic() + idle_wait_s
    while True:
        r = requests.post(url + path, json=payload, timeout=120)
        if r.status_code == 200:
            return
        if "idle" not in r.text or time.monotonic() > deadline:
            raise RolloutError(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        time.sleep(0.1)


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
    """Colocated GPU servers side by side: server ``index`` starts at GPU ``index*tp``, the
    GPUs of trainer ranks ``index*tp ..`` (what the tensor mode's handles assume); unless
    SRFT_ROLLOUT_GPUS places the servers."""
    if (resolve_mode(cfg.weight_sync) != "tensor" or not cuda_available()
            or os.environ.get("SRFT_ROLLOUT_GPUS", "").strip()):
        return []
    return ["--base-gpu-id", str(index * cfg.server_tp)]


def launch_servers(cfg, model_path: Optional[str], work_dir: Optional[str] = None,
                   server_args: Sequence[str] = ()) -> list[SGLangServer]:
    """Attach to ``cfg.urls`` or start ``cfg.num_servers`` servers (in parallel)."""
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
    servers = [SGLangServer(model_path, tp=cfg.server_tp,
                            extra_args=[*server_args, *colocated_gpu_args(cfg, i)],
                            env=server_gpu_env(i, cfg.server_tp, cfg.num_servers),
                            log_path=os.path.join(log_dir, f"sglang-{i}.log"),
                            startup_timeout_s=cfg.startup_timeout_s,
                            mem_fraction=sglang_mem_fraction(
                                cfg.mem_fraction, resolve_mode(cfg.weight_sync) == "tensor"))
               for i in range(cfg.num_servers)]
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
