"""Colocated servers' GPU memory (``rollout.weight_sync=tensor``): SGLang's
``/release_memory_occupation`` and ``/resume_memory_occupation`` per memory tag, and which
tags each server has released, so that a request is only made when it changes something."""
from __future__ import annotations

import time
from typing import Sequence

import requests
import torch

from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.rollout.errors import RolloutError
from srft_mcore.rollout.sync_types import rank_and_size

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""What ``/release_memory_occupation`` frees on a GPU server (SGLang's memory-saver tags)."""

RELEASE = "/release_memory_occupation"
RESUME = "/resume_memory_occupation"


class ServerMemory:
    """The released memory tags of each server in ``urls``; its requests are collective:
    rank 0 posts them, every rank records the outcome."""

    def __init__(self, urls: Sequence[str], group=None):
        self.urls = list(urls)
        self.group = group
        self._released: dict[str, set] = {}  # url -> memory tags it has released
        self.calls = 0  # release/resume requests rank 0 made (all servers together)

    @property
    def released(self) -> dict[str, list[str]]:
        """The memory tags each server has released (empty when all is resident)."""
        return {u: sorted(t) for u, t in self._released.items() if t}

    def forget(self, urls: Sequence[str]) -> None:
        """A restarted server starts with nothing released."""
        for url in urls:
            self._released.pop(url, None)

    def release(self, tags: Sequence[str]) -> None:
        self._request(RELEASE, self._todo(tags, released=False))

    def resume(self, tags: Sequence[str]) -> None:
        todo = self._todo(tags, released=True)
        if todo and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached blocks are what the server maps
        self._request(RESUME, todo)

    def _todo(self, tags: Sequence[str], released: bool) -> dict[str, list[str]]:
        """Per server, the ``tags`` that are (``released``) or are not released."""
        out = {}
        for url in self.urls:
            have = self._released.get(url, set())
            todo = [t for t in tags if (t in have) == released]
            if todo:
                out[url] = todo
        return out

    def _request(self, path: str, todo: dict[str, list[str]]) -> None:
        """Rank 0 posts ``path`` with each server's tags; every rank records the outcome."""
        if not todo:
            return
        status = None
        if rank_and_size(self.group)[0] == 0:
            try:
                for url, tags in todo.items():
                    _post_memory(url, path, {"tags": tags})
                    self.calls += 1
            except Exception as e:  # noqa: BLE001 - every rank raises below
                status = f"{type(e).__name__}: {e}"
        status = broadcast_object(status, self.group)
        if status is not None:
            raise RolloutError(status)
        for url, tags in todo.items():
            have = self._released.setdefault(url, set())
            if path == RELEASE:
                have.update(tags)
            else:
                have.difference_update(tags)


def _post_memory(url: str, path: str, payload: dict, idle_wait_s: float = 10.0) -> None:
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
