"""Megatron tensor-parallel layout: full (TP1) tensors <-> this rank's shards, and global names.

Megatron marks each TP-split parameter with ``tensor_model_parallel`` and ``partition_dim``.
Splitting along that dim is right for every parameter except the fused gate/up
``linear_fc1`` of a gated MLP, whose rank ``i`` holds ``[gate_i; up_i]`` (not the i-th slice
of ``[gate; up]``). The query-group interleaved ``linear_qkv`` splits evenly: each rank holds
whole query groups. The bridge and the parallel checks use only these functions.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def global_name(model, local_name: str) -> str:
    """``decoder.layers.<local i>.x`` -> ``decoder.layers.<global i>.x`` (PP stage offset)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    layer = model.decoder.layers[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def partition_dim(param: torch.Tensor) -> Optional[int]:
    """The dim this parameter is split on across TP ranks, or None when replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def split_for_rank(full: torch.Tensor, name: str, dim: Optional[int], tp_size: int,
                   tp_rank: int, gated: bool = True) -> torch.Tensor:
    """This rank's shard of a full (TP1-layout) Megatron tensor."""
    if dim is None or tp_size == 1:
        return full
    if gated and is_gated_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]],
                         dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def merge_shards(shards: Sequence[torch.Tensor], name: str, dim: Optional[int],
                 gated: bool = True) -> torch.Tensor:
    """Inverse of :func:`split_for_rank`: the full tensor from all TP ranks' shards."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated and is_gated_fc1(name):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(list(shards), dim=dim)


def full_shape(param: torch.Tensor, tp_size: int) -> torch.Size:
    dim = partition_dim(param)
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= tp_size
    return torch.Size(shape)
