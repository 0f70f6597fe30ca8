"""Write a sharded HF safetensors checkpoint one tensor at a time.

The tensor names, shapes and dtypes are known up front (from the HF config), so every
shard's header is written first and each tensor's bytes go straight to their offset:
nothing but the tensor being written is held in memory. Produces
``model-0000x-of-0000y.safetensors`` and ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from srft_mcore.models.name_map import BridgeError

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float64: "F64"}


def shard_plan(tensors: Sequence[tuple], max_shard_bytes: int) -> list[list[tuple]]:
    """Split ``(name, shape, dtype)`` entries, in order, into shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards, cur, used = [], [], 0
    for name, shape, dtype in tensors:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if cur and used + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append((name, tuple(shape), dtype))
        used += nbytes
    if cur:
        shards.append(cur)
    return shards


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class StreamingSafetensorsWriter:
    """``write(name, tensor)`` in any order; ``close()`` checks completeness, writes the index."""

    def __init__(self, out_dir: str, tensors: Sequence[tuple], max_shard_bytes: int):
        self.out_dir = out_dir
        shards = shard_plan(tensors, max_shard_bytes)
        self.where = {}
        self.weight_map = {}
        self.files = []
        self.total = 0
        n = len(shards)
        for i, entries in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in entries:
                nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            path = os.path.join(out_dir, fname)
            f = open(path, "wb")
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)
            base = 8 + len(raw)
            self.files.append(f)
            for name, shape, dtype in entries:
                self.where[name] = (f, base + header[name]["data_offsets"][0], shape, dtype)
                self.weight_map[name] = fname
            self.total += offset
        self.written = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise BridgeError(f"tensor {name!r} is not part of the planned HF checkpoint")
        f, offset, shape, dtype = self.where[name]
        if tuple(tensor.shape) != tuple(shape):
            raise BridgeError(f"tensor {name!r}: shape {tuple(tensor.shape)} does not match the "
                              f"shape {tuple(shape)} that config.json implies")
        if tensor.dtype != dtype:
            raise BridgeError(f"tensor {name!r}: dtype {tensor.dtype}, expected {dtype}")
        if name in self.written:
            raise BridgeError(f"tensor {name!r} written twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.seek(offset)
        f.write(memoryview(data))
        self.written.add(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
        missing = [n for n in self.where if n not in self.written]
        if missing:
            raise BridgeError(f"{len(missing)} tensors were never written, e.g. {missing[:5]}")
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)

    def abort(self) -> None:
        for f in self.files:
            f.close()
