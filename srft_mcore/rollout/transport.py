"""The interface of a weight-sync transport (how the buckets reach the servers), with the
transfer that the ``disk`` and ``distributed`` transports share: each PP stage's source rank
sends its own buckets."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from srft_mcore.rollout.sync_types import NamedTensors, SourceInfo, rank_error


class Transport:
    """How the buckets reach the servers. :meth:`transfer` runs on every rank (step 2);
    ``commit`` on rank 0 after every rank has transferred."""

    mode = ""

    def prepare(self, urls: Sequence[str], src: SourceInfo, version: str, group=None) -> None:
        """Per-rank set-up before the transfer; no collectives (a rank may skip it)."""

    def transfer(self, urls: Sequence[str], src: SourceInfo, tensors: Callable[[], NamedTensors],
                 bucket_bytes: int, version: str, group=None) -> tuple[int, int, Optional[str]]:
        """Step 2 on this rank; returns (bytes sent, buckets sent, error or None); an error
        is ``(text, [(server, route), ...])`` (see :func:`rank_error`).

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
                    error = rank_error(f"rank {src.rank} (pp stage {src.pp_rank}): send", e)
        return sent, buckets, error

    def send(self, urls: Sequence[str], bucket, version: str) -> int:
        raise NotImplementedError

    def commit(self, urls: Sequence[str], version: str) -> None:
        pass

    def failed(self, urls: Sequence[str]) -> None:
        """Forget per-server state after a failure (or a server restart)."""

    def close(self) -> None:
        pass
