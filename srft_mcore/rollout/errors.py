"""The rollout's exceptions, in one place below everything that raises them: the weight sync,
the route checks and the engine."""
from __future__ import annotations

from typing import Sequence


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


class RolloutError(RuntimeError):
    """Generation failed and could not be recovered (e.g. an attached server is down)."""
