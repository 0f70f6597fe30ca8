"""The ``distributed`` weight sync: a weight-update process group per (PP stage, server),
created once (NCCL on GPU, gloo on CPU) between the stage's source rank and the server's
ranks; each bucket is one flattened tensor broadcast into ``/update_weights_from_distributed``.
A group that failed is torn down and created anew on the next sync."""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.distributed as dist

from srft_mcore.rollout.errors import WeightSyncError
from srft_mcore.rollout.sync_buckets import flatten_bucket
from srft_mcore.rollout.transport import Transport
from srft_mcore.rollout.update_protocol import post


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
                post(url, "/init_weights_update_group", {
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
                    post(url, "/update_weights_from_distributed", {
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
                post(url, "/destroy_weights_update_group", {"group_name": name}, timeout_s=10)
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
