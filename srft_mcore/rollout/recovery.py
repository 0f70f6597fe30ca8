"""Each rank's restart policy for the rollout servers it launched (rank 0: also the router
and the servers attached by URL): which of those a failed request points at are really down
(dead or hung, not a transient failure), and restarting the ones launched here. The engine
runs it on every rank, makes the outcome collective and re-syncs the weights."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import requests

from srft_mcore.rollout.errors import RolloutError
from srft_mcore.rollout.router import SGLangRouter
from srft_mcore.rollout.server import SGLangServer


class ServerRecovery:
    """Restarts the servers (and router) of one engine that stopped serving, of those this
    rank handles: ``mine`` (their URLs; None: all of them, as on a one-rank engine)."""

    def __init__(self, servers: Sequence[SGLangServer], router: Optional[SGLangRouter],
                 health_timeout_s: float = 60.0, mine: Optional[set] = None,
                 reattach_timeout_s: float = 0.0):
        self.servers = servers
        self.router = router
        self.health_timeout_s = health_timeout_s
        self.mine = mine
        self.reattach_timeout_s = reattach_timeout_s
        """How long a server attached by URL that stopped answering is waited for."""

    def handles(self, server: SGLangServer) -> bool:
        return self.mine is None or server.url in self.mine

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def restart_dead(self) -> list[str]:
        """Restart owned servers (and a launched router) whose process has exited; return
        the restarted servers' URLs."""
        # process liveness only: an HTTP health probe costs ~1 s per step on CPU, and
        # a hung server is caught by the request timeouts of generate and sync
        dead = [s.url for s in self.servers
                if self.handles(s) and s.owned and not s.is_alive()]
        self.restart_router_if_dead(probe_attached=False)
        return self.recover(dead) if dead else []

    def responsive(self, server: SGLangServer) -> bool:
        try:
            r = requests.get(server.url + "/health_generate", timeout=self.health_timeout_s)
            return r.status_code == 200
        except requests.RequestException:
            return False

    def restart_router_if_dead(self, probe_attached: bool = True) -> bool:
        """Restart a launched router whose process has exited; an attached one that does not
        answer /health (probed only with ``probe_attached``) is an error: it is not ours to
        restart."""
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

    def suspects(self, failed_urls: Sequence[str]) -> list[str]:
        """The servers to check after requests to ``failed_urls`` failed (rank 0). A failure
        through the router does not say which server failed: the router is checked
        (restarted if it was launched here and has exited), then every server."""
        if self.router is not None and self.router.url in failed_urls:
            self.restart_router_if_dead()
            return self.urls
        return list(failed_urls)

    def recover(self, failed_urls: Sequence[str]) -> list[str]:
        """Restart the failed servers this rank handles that are dead or hung; return their
        URLs."""
        restarted = []
        for server in self.servers:
            if server.url not in failed_urls or not self.handles(server):
                continue
            if server.is_alive() and self.responsive(server):
                continue  # a transient failure: just retry
            if not server.owned:
                if not self.wait_for(server):
                    raise RolloutError(
                        f"server {server.url} stopped answering and did not come back within "
                        f"rollout.reattach_timeout_s={self.reattach_timeout_s:g} s; it was "
                        f"attached (rollout.urls), not launched here, so it is not ours to "
                        f"restart")
                restarted.append(server.url)  # back, maybe restarted: it needs the weights
                continue
            server.restart()
            restarted.append(server.url)
        return restarted

    def wait_for(self, server: SGLangServer) -> bool:
        """Wait up to :attr:`reattach_timeout_s` for ``server`` to answer /health (polled
        every tenth of that, between 0.2 and 5 s)."""
        poll_s = min(5.0, max(0.2, self.reattach_timeout_s / 10))
        deadline = time.monotonic() + self.reattach_timeout_s
        print(f"[srft] server {server.url} does not answer; waiting up to "
              f"{self.reattach_timeout_s:g} s for it (rollout.reattach_timeout_s)", flush=True)
        while True:
            if server.healthy(timeout_s=min(poll_s, self.health_timeout_s)):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_s, left))

    def wait_for_attached(self, urls: Sequence[str]) -> None:
        """Before a sync is retried: wait for the servers among ``urls`` that were attached
        by URL and do not answer (a restarted one gets the whole sync again)."""
        for server in self.servers:
            if (server.url in urls and not server.owned
                    and not server.healthy(timeout_s=min(5.0, self.health_timeout_s))):
                self.wait_for(server)
