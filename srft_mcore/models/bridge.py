"""HF <-> Megatron weights: one mapping for conversion, start-up loading and weight sync.

The names and shapes come from ``name_map.py`` (the family's table applied to the HF
config); this module moves the tensors:

* :func:`load_hf_into_model`: each rank reads only its TP slices of its PP stage's tensors
  from the safetensors files (lazy ``get_slice``), never the whole model.
* :func:`export_hf_weights`: yields ``(hf_name, full_tensor)`` one at a time, gathered over
  TP (all-gather on the given group); each PP stage yields its own layers (global numbers).
* :func:`gather_hf_weights`: the same, with every stage's tensors sent to one rank.
* :func:`bucketize`: groups an export stream into buckets of about ``bucket_bytes``.
* :func:`mcore_to_hf` / :func:`hf_slice_for_rank`: the pure per-tensor transforms.
* :class:`HFCheckpoint`: the lazy, validating reader of a HF safetensors checkpoint.

Model parameters of either layer spec (local, or transformer-engine) are accepted, so loading
HF weights, the HF export and the weight sync work for both.

Vocabulary padding: Megatron pads the vocab (see ``builder.padded_vocab_size``); padded rows
are zero on import and trimmed on export. Tied embeddings: the HF checkpoint holds only
``model.embed_tokens.weight``; the last PP stage's copy (``output_layer.weight``) is loaded
from it and is never exported.

Legend: ``full`` = a Megatron tensor in the TP1 layout; ``shard`` = one TP rank's part.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from srft_mcore.launching.distributed import comm_device
from srft_mcore.models.arch import TensorMap
from srft_mcore.models.builder import unwrap_gpt
from srft_mcore.models.name_map import (BridgeError, Dims, check_tp, expected_hf_shapes, hf_names,
                                        lookup)
from srft_mcore.models.sharding import global_name, merge_shards, partition_dim

# HF tensors that are buffers, not weights (older checkpoints store them)
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- transforms
def hf_slice_for_rank(tm: TensorMap, layer: Optional[int], src, dims: Dims,
                      padded_vocab: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's Megatron shard, reading only its rows/columns of the HF tensors.

    ``src.read(hf_name, index)`` returns ``hf_tensor[index]`` (``index`` a tuple of slices,
    e.g. through ``safe_open(...).get_slice``) and is called only with this rank's part;
    ``src.shape(hf_name)`` gives the full shape.
    """
    names = hf_names(tm, layer)
    read = src.read
    r, n = tp_rank, tp_size
    if tm.layout == "replicated":
        return read(names[0], (slice(None),))
    if tm.layout == "row":
        cols = src.shape(names[0])[1] // n
        return read(names[0], (slice(None), slice(r * cols, (r + 1) * cols)))
    if tm.layout == "vocab":
        rows = padded_vocab // n
        lo, hi = r * rows, (r + 1) * rows
        real = read(names[0], (slice(min(lo, dims.vocab), min(hi, dims.vocab)), slice(None)))
        if real.shape[0] == rows:
            return real
        shard = real.new_zeros((rows,) + tuple(real.shape[1:]))
        shard[: real.shape[0]] = real
        return shard
    if tm.layout == "gate_up":
        rows = dims.ffn // n
        part = (slice(r * rows, (r + 1) * rows),)
        return torch.cat([read(names[0], part), read(names[1], part)], dim=0)
    if tm.layout == "qkv":
        g = dims.groups // n
        qg = dims.q_per_group * dims.head_dim
        d = dims.head_dim
        q = read(names[0], (slice(r * g * qg, (r + 1) * g * qg),))
        k = read(names[1], (slice(r * g * d, (r + 1) * g * d),))
        v = read(names[2], (slice(r * g * d, (r + 1) * g * d),))
        tail = tuple(q.shape[1:])
        fused = torch.cat([q.reshape((g, qg) + tail), k.reshape((g, d) + tail),
                           v.reshape((g, d) + tail)], dim=1)
        return fused.reshape((-1,) + tail)
    raise BridgeError(f"unknown layout {tm.layout!r}")


def mcore_to_hf(tm: TensorMap, layer: Optional[int], full: torch.Tensor,
                dims: Dims) -> list[tuple[str, torch.Tensor]]:
    """A full (TP1-layout) Megatron tensor -> its HF tensors (vocab padding trimmed)."""
    names = hf_names(tm, layer)
    if tm.layout in ("replicated", "row"):
        return [(names[0], full)]
    if tm.layout == "vocab":
        return [(names[0], full[: dims.vocab])]
    if tm.layout == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return [(names[0], gate), (names[1], up)]
    if tm.layout == "qkv":
        qg, d = dims.q_per_group * dims.head_dim, dims.head_dim
        tail = tuple(full.shape[1:])
        q, k, v = full.reshape((dims.groups, qg + 2 * d) + tail).split([qg, d, d], dim=1)
        return [(names[0], q.reshape((-1,) + tail)), (names[1], k.reshape((-1,) + tail)),
                (names[2], v.reshape((-1,) + tail))]
    raise BridgeError(f"unknown layout {tm.layout!r}")


class TensorSource:
    """In-memory HF tensors with the reader interface of :class:`HFCheckpoint`."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def read(self, name: str, index: tuple) -> torch.Tensor:
        return self.tensors[name][index]

    def shape(self, name: str) -> torch.Size:
        return self.tensors[name].shape


# --------------------------------------------------------------------------- HF files
class HFCheckpoint:
    """Lazy reader of a HF safetensors checkpoint; validates files, names and shapes.

    ``read(name, index)`` returns only the requested part of a tensor. With
    ``keep_open=False`` the files are closed after validation and every read opens (maps)
    its file and closes it again, so the pages it touched do not stay in this process.
    """

    def __init__(self, hf_dir: str, hf: Optional[dict] = None, validate: bool = True,
                 keep_open: bool = True):
        from safetensors import safe_open

        self.dir = hf_dir
        self.hf = hf if hf is not None else _read_json(os.path.join(hf_dir, "config.json"))
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                raise BridgeError(f"no *.safetensors files in {hf_dir!r} (only safetensors "
                                  f"checkpoints are supported)")
            weight_map = None
            self._files = files
        self._handles = {}
        self.location = {}
        files = sorted(set(weight_map.values())) if weight_map else self._files
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.isfile(path):
                missing = sorted(k for k, v in (weight_map or {}).items() if v == fname)
                raise BridgeError(f"shard {fname!r} listed in model.safetensors.index.json is "
                                  f"missing from {hf_dir!r} (it holds {len(missing)} tensors, "
                                  f"e.g. {missing[:3]})")
            try:
                handle = safe_open(path, framework="pt", device="cpu")
                _check_file_size(path, handle)
            except BridgeError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own types
                raise BridgeError(f"shard {path!r} is truncated or corrupt: {e}") from e
            self._handles[fname] = handle
            for key in handle.keys():
                self.location[key] = fname
        if weight_map:
            absent = sorted(k for k, v in weight_map.items() if self.location.get(k) != v)
            if absent:
                raise BridgeError(f"tensors listed in the index are missing from their shard "
                                  f"files: {absent[:5]}{' ...' if len(absent) > 5 else ''}")
        if validate:
            self.validate()
        if not keep_open:
            self._handles = None

    @contextlib.contextmanager
    def _file(self, name: str):
        if name not in self.location:
            raise BridgeError(f"HF checkpoint {self.dir!r} has no tensor {name!r}")
        if self._handles is not None:
            yield self._handles[self.location[name]]
            return
        from safetensors import safe_open

        with safe_open(os.path.join(self.dir, self.location[name]), framework="pt",
                       device="cpu") as handle:
            yield handle

    def validate(self) -> None:
        want = expected_hf_shapes(self.hf)
        missing = [n for n in want if n not in self.location]
        if missing:
            raise BridgeError(f"HF checkpoint {self.dir!r} lacks {len(missing)} tensors the "
                              f"config needs: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        tied = bool(self.hf.get("tie_word_embeddings", False))
        extra = [n for n in self.location if n not in want and not _IGNORED_HF.match(n)
                 and not (tied and n == "lm_head.weight")]
        if extra:
            raise BridgeError(f"HF checkpoint {self.dir!r} has tensors the "
                              f"{self.hf.get('model_type')} map does not cover: {extra[:5]}")
        for name, shape in want.items():
            sl = self._handles[self.location[name]].get_slice(name)
            got = torch.Size(sl.get_shape())
            if got != shape:
                raise BridgeError(f"tensor {name!r}: checkpoint shape {tuple(got)} does not "
                                  f"match the shape {tuple(shape)} that config.json implies")
            dtype = sl.get_dtype()
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise BridgeError(f"tensor {name!r}: dtype {dtype} is not a floating dtype")

    def read(self, name: str, index: tuple) -> torch.Tensor:
        with self._file(name) as handle:
            return handle.get_slice(name)[index]

    def shape(self, name: str) -> torch.Size:
        with self._file(name) as handle:
            return torch.Size(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with self._file(name) as handle:
            return handle.get_tensor(name)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise BridgeError(f"missing {path!r}")
    with open(path) as f:
        return json.load(f)


def _check_file_size(path: str, handle) -> None:
    """safetensors maps lazily: a cut-off file is only noticed here, before any reads."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    size = os.path.getsize(path)
    if size < 8 + header_len + end:
        raise BridgeError(f"shard {path!r} is truncated: {size} bytes, its header needs "
                          f"{8 + header_len + end}")


# --------------------------------------------------------------------------- load
def _chunks(model) -> list:
    return [unwrap_gpt(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _uses_te(model) -> bool:
    return any(n.endswith("layer_norm_weight") for n, _ in model.named_parameters())


def _group_rank_size(group, rank, size) -> tuple[int, int]:
    if rank is not None and size is not None:
        return rank, size
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def hf_param_shard(model, name: str, shape: torch.Size, src, hf: dict, dims: Dims,
                   tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of parameter ``name`` (local name in the model chunk ``model``,
    expected shape ``shape``) read from ``src`` (an :class:`HFCheckpoint`)."""
    gname = global_name(model, name)
    tm, layer = lookup(hf, gname)
    padded = model.vocab_size if tm.layout == "vocab" else 0
    shard = hf_slice_for_rank(tm, layer, src, dims, padded, tp_size, tp_rank)
    if shard.shape != shape:
        raise BridgeError(f"{gname} (from {hf_names(tm, layer)}): HF slice shape "
                          f"{tuple(shard.shape)} does not match the Megatron shard "
                          f"{tuple(shape)} (tp_rank {tp_rank} of {tp_size})")
    return shard


@torch.no_grad()
def load_hf_into_model(model, hf_dir: str, hf_config: Optional[dict] = None, tp_group=None,
                       tp_rank: Optional[int] = None, tp_size: Optional[int] = None,
                       progress: bool = False) -> dict:
    """Copy HF weights into this rank's model chunk(s); each rank reads only its slices.

    ``model``: a GPTModel (or list of chunks, possibly DDP-wrapped) built for this rank.
    TP position from ``tp_rank``/``tp_size`` or ``tp_group``. No collectives are issued.
    Returns ``{'tensors': n, 'bytes': b}`` read by this rank.
    """
    hf = hf_config if hf_config is not None else _read_json(os.path.join(hf_dir, "config.json"))
    rank, size = _group_rank_size(tp_group, tp_rank, tp_size)
    check_tp(hf, size)
    ckpt = HFCheckpoint(hf_dir, hf)
    dims = Dims.from_hf(hf)
    n = nbytes = 0
    items = [(m, name, p) for m in _chunks(model) for name, p in m.named_parameters()]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="load hf", unit="tensor")
    for m, name, param in items:
        shard = hf_param_shard(m, name, param.shape, ckpt, hf, dims, size, rank)
        param.copy_(shard.to(param.dtype))
        n += 1
        nbytes += shard.numel() * shard.element_size()
    return {"tensors": n, "bytes": nbytes}


# --------------------------------------------------------------------------- export
def _gather_tp(param: torch.Tensor, name: str, group, size: int) -> torch.Tensor:
    dim = partition_dim(param)
    if dim is None or size == 1:
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return merge_shards(shards, name, dim)


@torch.no_grad()
def export_hf_weights(model, hf_config: dict, tp_group=None, dtype: Optional[torch.dtype] = None,
                      tp_size: Optional[int] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for this PP stage's tensors, gathered over TP.

    Every rank of ``tp_group`` must iterate in step (each tensor is one all-gather on that
    group); all of them get the full tensors. Each PP stage yields only the tensors it
    holds, under global layer numbers; with tied embeddings only the stage holding the
    input embedding yields ``model.embed_tokens.weight`` (no ``lm_head.weight``).
    ``dtype`` casts on the way out (None keeps the parameter dtype).
    """
    _, size = _group_rank_size(tp_group, None, tp_size)
    hf = hf_config
    dims = Dims.from_hf(hf)
    for m in _chunks(model):
        for name, param in m.named_parameters():
            gname = global_name(m, name)
            if gname == "output_layer.weight" and dims.tied:
                continue
            tm, layer = lookup(hf, gname)
            full = _gather_tp(param, gname, tp_group, size)
            for hf_name, t in mcore_to_hf(tm, layer, full, dims):
                yield hf_name, (t if dtype is None else t.to(dtype)).contiguous()


@torch.no_grad()
def gather_hf_weights(model, hf_config: dict, tp_group=None, pp_group=None, dst_pp_rank: int = 0,
                      dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """All HF tensors of the model, stage by stage, yielded on one rank.

    Yields on the rank with TP rank 0 and PP rank ``dst_pp_rank``; every other rank must
    iterate too (it takes part in the gathers and sends) and yields nothing. Stage ``s``
    sends its tensors from its TP rank 0 to the destination with point-to-point messages.
    """
    tp_rank, _ = _group_rank_size(tp_group, None, None)
    pp_rank, pp_size = _group_rank_size(pp_group, None, None)
    is_dst = tp_rank == 0 and pp_rank == dst_pp_rank
    for stage in range(pp_size):
        if stage == pp_rank:
            for hf_name, t in export_hf_weights(model, hf_config, tp_group, dtype):
                if is_dst:
                    yield hf_name, t
                elif tp_rank == 0:
                    dst = dist.get_global_rank(pp_group, dst_pp_rank)
                    dist.send_object_list([(hf_name, tuple(t.shape), t.dtype)], dst=dst)
                    dist.send(t, dst=dst)
            if tp_rank == 0 and not is_dst:
                dist.send_object_list([None], dst=dist.get_global_rank(pp_group, dst_pp_rank))
        elif is_dst:
            src = dist.get_global_rank(pp_group, stage)
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=src)
                if meta[0] is None:
                    break
                hf_name, shape, t_dtype = meta[0]
                t = torch.empty(shape, dtype=t_dtype, device=comm_device(pp_group))
                dist.recv(t, src=src)
                yield hf_name, t


def bucketize(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
              ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` (a tensor larger
    than that forms a bucket of its own). Order is kept."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket, used = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and used + nbytes > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, t))
        used += nbytes
    if bucket:
        yield bucket


__all__ = ["HFCheckpoint", "TensorSource", "bucketize", "export_hf_weights", "gather_hf_weights",
           "hf_param_shard", "hf_slice_for_rank", "load_hf_into_model", "mcore_to_hf"]
