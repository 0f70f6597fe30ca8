"""sglang-router in front of several SGLang servers: one URL for /generate.

Usage::

    from srft_mcore.rollout.router import SGLangRouter

    router = SGLangRouter.launch(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])
    print(router.url)            # http://127.0.0.1:<port>: POST /generate here
    ...
    router.stop()

    remote = SGLangRouter.attach("http://10.0.0.4:30100")   # a router someone else runs

The router (the ``sglang-router`` package, a Rust binary behind a Python launcher) spreads
/generate requests over its workers by ``policy`` and retries a failed request on another
worker. It does not forward weight updates to every worker, so the rollout engine keeps the
list of server URLs for the weight sync and memory requests and sends only /generate through
the router.

The router forwards the sampling fields the trainer and the evaluation use (temperature,
top_p, max_new_tokens, n, stop, stop_token_ids, ignore_eos, log-probs, input_ids) but drops
``sampling_params.custom_params``, which seeded rollouts (``rollout.seeded``) need, so
``config.validate`` refuses the two together.

Like :class:`~srft_mcore.rollout.server.SGLangServer`, a launched router binds to
127.0.0.1 unless ``host`` says otherwise (its Prometheus endpoint too, on a port of its own),
runs in its own process group, dies with the process that launched it and is stopped at
interpreter exit.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

import requests

from srft_mcore.launching.distributed import free_port
from srft_mcore.rollout.server import ManagedProcess, ServerStartError

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


class RouterError(ServerStartError):
    """The router is not installed, exited, or did not become healthy in time."""


def router_available() -> bool:
    """Whether ``sglang_router`` imports here (imported, not just found: a broken install
    counts as absent)."""
    try:
        importlib.import_module("sglang_router")
    except ImportError:
        return False
    return True


class SGLangRouter(ManagedProcess):
    """One sglang-router process we own, or the URL of one we attach to."""

    kind = "router"
    log_prefix = "sglang_router"
    start_error = RouterError

    def __init__(self, worker_urls: Sequence[str] = (), port: Optional[int] = None,
                 host: str = "127.0.0.1", policy: str = "cache_aware",
                 log_path: Optional[str] = None, startup_timeout_s: float = 300.0,
                 request_timeout_s: float = 600.0, extra_args: Sequence[str] = (),
                 url: Optional[str] = None):
        if policy not in POLICIES:
            raise ValueError(f"router policy {policy!r}: expected one of {POLICIES}")
        super().__init__(port=port, host=host, log_path=log_path,
                         startup_timeout_s=startup_timeout_s, url=url)
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.metrics_port: Optional[int] = None
        self.policy = policy
        self.request_timeout_s = request_timeout_s
        self.extra_args = list(extra_args)

    @classmethod
    def launch(cls, worker_urls: Sequence[str], **kwargs) -> "SGLangRouter":
        """Start a router for ``worker_urls`` and wait until it answers /health."""
        router = cls(worker_urls, **kwargs)
        router.start()
        router.wait_healthy()
        return router

    def command(self) -> list[str]:
        if not self.worker_urls:
            raise ValueError("a router needs at least one worker URL")
        # the Prometheus endpoint would otherwise take 0.0.0.0:29000 (one router per machine)
        return [sys.executable, "-m", "sglang_router.launch_router",
                "--host", self.host, "--port", str(self.port),
                "--worker-urls", *self.worker_urls, "--policy", self.policy,
                "--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port),
                "--request-timeout-secs", str(max(1, int(self.request_timeout_s))),
                "--worker-startup-timeout-secs", str(max(1, int(self.startup_timeout_s))),
                "--shutdown-grace-period-secs", "5", "--log-level", "warn", *self.extra_args]

    def start(self) -> "SGLangRouter":
        """Spawn the router (returns at once; see :meth:`wait_healthy`)."""
        if not router_available():
            raise RouterError("rollout.router needs the sglang-router package "
                              "(pip install sglang-router; requirements/constraints.txt pins it)")
        if self._url is not None and self.proc is None:
            raise RuntimeError(f"{self._url} was attached, not launched here")
        # both ports from this module's free_port (tests/test_router.py replaces it)
        if self.port is None:
            self.port = free_port()
        if self.metrics_port is None:
            self.metrics_port = free_port()
        return self._spawn()

    def _name(self, with_url: bool) -> str:
        return f"sglang-router at {self.url}" if with_url else "sglang-router"

    def ready(self, timeout_s: float = 5.0) -> bool:
        """/health answers and every worker is registered and healthy (the router's
        /readiness counts them): until then it sends every request to the workers it has,
        and a rollout started early lands on one server alone."""
        if not self.healthy(timeout_s):
            return False
        if not self.worker_urls:
            return True
        try:
            r = requests.get(self.url + "/readiness", timeout=timeout_s)
            if r.status_code == 404:  # a router release without the endpoint
                return True
            return int(r.json().get("healthy_workers", 0)) >= len(self.worker_urls)
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """As for a server, with a shorter grace period before SIGKILL."""
        super().stop(timeout_s)

    def __repr__(self) -> str:
        return f"SGLangRouter(url={self.url!r}, pid={self.pid}, workers={self.worker_urls})"


def router_for(cfg, server_urls: Sequence[str], work_dir: Optional[str] = None
               ) -> Optional[SGLangRouter]:
    """The router the rollout config asks for (``cfg``: a ``RolloutConfig``): attached to
    ``cfg.router_url``, launched in front of ``server_urls`` when ``cfg.router``, else None."""
    if cfg.router_url:
        if cfg.router:
            raise ValueError("rollout.router=true launches a router and rollout.router_url "
                             "attaches to one: set only one of them")
        if not cfg.urls:
            raise ValueError(f"rollout.router_url={cfg.router_url!r} needs rollout.urls: the "
                             f"servers behind the router, which the weight sync must reach")
        router = SGLangRouter.attach(cfg.router_url)
        if not router.healthy(timeout_s=10.0):
            raise RouterError(f"rollout.router_url={cfg.router_url!r} does not answer /health")
        return router
    if not cfg.router:
        return None
    log_path = os.path.join(work_dir, "sglang-router.log") if work_dir else None
    return SGLangRouter.launch(server_urls, policy=cfg.router_policy, log_path=log_path,
                               startup_timeout_s=cfg.startup_timeout_s,
                               request_timeout_s=cfg.request_timeout_s)
