"""Which weight-update protocol each SGLang server can take, read from the routes it serves.

SGLang's HTTP API differs between releases, and a route that is missing only shows when it
is first called: after the first training step. So the engine reads each server's routes
once at start-up (:func:`check_routes`) and either picks the protocol the server supports or
refuses it then: SGLang 0.5.23 loads tensor and distributed updates only inside a begin/end
session, SGLang 0.5.19 has no session routes and takes pause -> flush -> update -> version ->
continue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import requests

from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.rollout.errors import UnsupportedServer
from srft_mcore.rollout.sync_types import MODES, rank_and_size, resolve_mode

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


def check_routes(urls: Sequence[str], mode: str, group=None) -> dict[str, ServerRoutes]:
    """Collective: rank 0 reads the routes of every server in ``urls``
    (:func:`check_servers`); every rank gets them, or every rank raises
    :class:`UnsupportedServer` alike when one cannot take ``mode``'s sync."""
    found, error = {}, None
    if rank_and_size(group)[0] == 0:
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
