"""The ``distributed`` weight sync: one weight-update process group per PP stage spanning
every server's TP ranks (NCCL on GPU, gloo on CPU), created once between the stage's source
rank (group rank 0) and the servers (server ``i`` at ranks ``1 + i*T .. i*T + T``). Each
bucket is one flattened tensor broadcast once into ``/update_weights_from_distributed`` on
every server at the same time, so the sync's transfer does not grow with the server count.

A sync of only some servers (a restarted one) gets a group of its own, keyed by the servers
it spans. A group that failed is torn down and created anew on the next sync.
``per_server=True`` keeps the earlier layout, one group per (stage, server) broadcast in
turn: ``benchmarks/weight_sync.py`` measures the two side by side.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from srft_mcore.rollout.errors import WeightSyncError
from srft_mcore.rollout.sync_buckets import flatten_bucket
from srft_mcore.rollout.transport import Transport
from srft_mcore.rollout.update_protocol import post


class DistributedTransport(Transport):
    """Broadcast groups from a PP stage's source rank to the servers (see module doc)."""

    mode = "distributed"

    def __init__(self, backend: Optional[str] = None, master_address: str = "127.0.0.1",
                 server_tp: int = 1, timeout_s: float = 600.0, per_server: bool = False):
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.server_tp = server_tp
        self.timeout_s = timeout_s
        self.per_server = per_server
        self._groups: dict = {}     # tuple of urls -> (group name, process group)
        self._epoch = 0
        self._pp_rank = 0

    def _members(self, urls: Sequence[str]) -> list[tuple[str, ...]]:
        """The server tuples this sync broadcasts to: all at once, or one by one."""
        return [(u,) for u in urls] if self.per_server else [tuple(urls)]

    def prepare(self, urls, src, version, group=None):
        self._pp_rank = src.pp_rank
        if src.sends:
            for members in self._members(urls):
                if members not in self._groups:
                    self._init_group(members)

    def _init_group(self, members: tuple[str, ...]) -> None:
        from datetime import timedelta

        from sglang.srt.utils.common import init_custom_process_group

        from srft_mcore.launching.distributed import free_port, own_rendezvous_store

        self._epoch += 1
        name = f"srft_wsync_pp{self._pp_rank}_{os.getpid()}_{self._epoch}"
        port = free_port()
        world = 1 + len(members) * self.server_tp
        calls = _Calls(members, lambda i, url: post(
            url, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": port,
                "rank_offset": 1 + i * self.server_tp, "world_size": world,
                "group_name": name, "backend": self.backend}, timeout_s=self.timeout_s))
        with own_rendezvous_store():
            group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{self.master_address}:{port}",
                world_size=world, rank=0, group_name=name,
                timeout=timedelta(seconds=self.timeout_s))
        failures = calls.join(self.timeout_s)
        if failures:
            _destroy(group)
            raise WeightSyncError("weight-update group failed: " + "; ".join(
                f"{url}: {why}" for url, why in failures),
                [(url, "/init_weights_update_group") for url, _ in failures])
        self._groups[members] = (name, group)

    def send(self, urls, bucket, version):
        flat, names, dtypes, shapes = flatten_bucket(bucket)
        for members in self._members(urls):
            name, group = self._groups[members]
            calls = _Calls(members, lambda i, url: post(
                url, "/update_weights_from_distributed", {
                    "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": name,
                    "load_format": "flattened_bucket", "flush_cache": False},
                timeout_s=self.timeout_s))
            dist.broadcast(flat, group=group, group_src=0)
            failures = calls.join(self.timeout_s)
            if failures:
                raise WeightSyncError("distributed update failed: " + "; ".join(
                    f"{url}: {why}" for url, why in failures),
                    [(url, "/update_weights_from_distributed") for url, _ in failures])
        return flat.numel()

    def failed(self, urls):
        """Tear down every group that spans one of ``urls`` (its other members leave it too:
        a group cannot lose a member)."""
        for members in [m for m in self._groups if set(m) & set(urls)]:
            name, group = self._groups.pop(members)
            for url in members:
                try:
                    post(url, "/destroy_weights_update_group", {"group_name": name},
                         timeout_s=10)
                except Exception:  # noqa: BLE001 - a restarted server no longer has it
                    pass
            _destroy(group)

    def close(self):
        self.failed([u for m in self._groups for u in m])


class _Calls:
    """HTTP calls running in threads while this rank joins the collective they wait on."""

    def __init__(self, members: Sequence[str], call: Callable[[int, str], object]):
        self.errors: dict = {}
        self.threads = []
        for i, url in enumerate(members):
            def run(i=i, url=url):
                try:
                    call(i, url)
                except Exception as e:  # noqa: BLE001 - reported by join
                    self.errors[url] = e
            th = threading.Thread(target=run, daemon=True)
            th.start()
            self.threads.append((url, th))

    def join(self, timeout_s: float) -> list[tuple[str, str]]:
        """[(url, why)] of the calls that failed or did not return in time."""
        out = []
        for url, th in self.threads:
            th.join(timeout_s)
            if url in self.errors:
                out.append((url, str(self.errors[url])))
            elif th.is_alive():
                out.append((url, "timed out"))
        return out


def _destroy(group) -> None:
    try:
        dist.destroy_process_group(group)
    except Exception:  # noqa: BLE001
        pass
