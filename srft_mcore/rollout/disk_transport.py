"""The ``disk`` weight sync (the fallback): each source writes its buckets as HF safetensors
shards of one directory per version, then ``/update_weights_from_disk`` loads it."""
from __future__ import annotations

import os
import shutil

from srft_mcore.rollout.transport import Transport
from srft_mcore.rollout.update_protocol import post


class DiskTransport(Transport):
    """Buckets become ``model-pp<stage>-<k>.safetensors`` in ``<root>/<version>/``."""

    mode = "disk"

    def __init__(self, root: str, keep: int = 1):
        self.root = root
        self.keep = keep
        self._count = 0
        self._pp_rank = 0

    def version_dir(self, version: str) -> str:
        return os.path.join(self.root, f"weights-{version}")

    def prepare(self, urls, src, version, group=None):
        self._count = 0
        self._pp_rank = src.pp_rank
        os.makedirs(self.version_dir(version), exist_ok=True)

    def send(self, urls, bucket, version):
        from safetensors.torch import save_file

        path = os.path.join(self.version_dir(version),
                            f"model-pp{self._pp_rank:02d}-{self._count:05d}.safetensors")
        self._count += 1
        tensors = {n: t.detach().cpu().contiguous() for n, t in bucket}
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self, urls, version):
        path = self.version_dir(version)
        for url in urls:
            post(url, "/update_weights_from_disk", {"model_path": path, "flush_cache": False})
        # older snapshots are no longer needed by any server
        old = sorted((d for d in os.listdir(self.root) if d.startswith("weights-")
                      and os.path.join(self.root, d) != path),
                     key=lambda d: os.path.getmtime(os.path.join(self.root, d)))
        for d in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
