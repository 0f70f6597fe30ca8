"""Megatron ``dist_checkpointing`` checkpoint -> HF checkpoint, streamed tensor by tensor.

The model is built once at TP1/PP1 on the ``meta`` device (no memory) to get its sharded
state dict; the checkpoint is then read one layer at a time, each Megatron tensor mapped
to its HF tensors by :func:`srft_mcore.models.bridge.mcore_to_hf` and written straight into its
place in the output safetensors shards. Peak memory is about one layer, not the model.

The checkpoint may come from a model of either layer spec (local or transformer-engine): its
tensor names are checked against the bridge's map first (:func:`srft_mcore.models.name_map.
checkpoint_naming`) and each tensor is read under the name it is stored under.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from tools.convert_ckpt.hf_to_mcore import BRIDGE_META, HF_SUBDIR
from tools.convert_ckpt.outdir import atomic_output_dir, check_output_dir, copy_side_files

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointFormatError(ValueError):
    pass


def read_bridge_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, BRIDGE_META)
    for need in (path, os.path.join(ckpt, HF_SUBDIR, "config.json"),
                 os.path.join(ckpt, "metadata.json")):
        if not os.path.isfile(need):
            raise CheckpointFormatError(
                f"{ckpt!r} is not a checkpoint written by `srft-convert hf-to-mcore` "
                f"(missing {os.path.relpath(need, ckpt)})")
    with open(path) as f:
        return json.load(f)


def _regions(sh, vocab: int, vocab_layout: bool, renames: dict) -> list:
    """(checkpoint key, global offset, region shape, tensor shape) of each stored part of one
    parameter (the region has the layer axis that the stacked layers prepend). ``renames``
    maps the local model's keys to those the checkpoint stores them under (its naming).

    A gated ``linear_fc1`` is a factory whose parts are the gate and the up halves. For the
    vocab-padded tensors only the real rows are read: the stored padding depends on the TP
    size the checkpoint was written at.
    """
    parts = sh.build() if hasattr(sh, "build") else [sh]
    out = []
    for st in (parts.values() if isinstance(parts, dict) else parts):
        local = tuple(st.local_shape)
        if vocab_layout:
            local = (vocab,) + local[1:]
        out.append((renames.get(st.key, st.key), tuple(st.global_offset),
                    (1,) * st.prepend_axis_num + local, local))
    return out


class _RegionReader:
    """Reads rectangular regions of tensors from a ``torch_dist`` (DCP) checkpoint.

    Megatron's loader expects a request to cover every stored shard a single process owns,
    so reading one layer of a layer-stacked tensor goes through DCP's reader directly with
    an explicit chunk per request; only the chunk files holding that region are read.
    """

    def __init__(self, ckpt: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.reader = FileSystemReader(ckpt)
        self.metadata = self.reader.read_metadata()

    def read(self, regions: list, dtype) -> list:
        import dataclasses

        import torch
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        dests = {str(i): torch.empty(shape, dtype=dtype) for i, (_, _, shape, _) in enumerate(regions)}
        items = []
        for i, (key, offset, shape, _) in enumerate(regions):
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise CheckpointFormatError(f"checkpoint has no tensor {key!r}")
            stored = tuple(md.size)
            if any(o + s > g for o, s, g in zip(offset, shape, stored)):
                raise CheckpointFormatError(
                    f"tensor {key!r}: requested region offset {offset} shape {shape} lies "
                    f"outside the stored shape {stored}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                items.append(dataclasses.replace(
                    item, dest_index=dataclasses.replace(item.dest_index, fqn=str(i),
                                                         offset=None)))
        planner = DefaultLoadPlanner()
        planner.set_up_planner(dests, self.metadata, True)
        self.reader.set_up_storage_reader(self.metadata, True)
        plan = self.reader.prepare_local_plan(LoadPlan(items))
        plan = self.reader.prepare_global_plan([plan])[0]
        self.reader.read_data(plan, planner).wait()
        return [dests[str(i)].reshape(r[3]) for i, r in enumerate(regions)]


def _layer_groups(model) -> list:
    from srft_mcore.models.name_map import layer_template

    groups, order = {}, []
    for name, _ in model.named_parameters():
        _, layer = layer_template(name)
        if layer not in groups:
            groups[layer] = []
            order.append(layer)
        groups[layer].append(name)
    return [groups[k] for k in order]


def _rank_main(ckpt: str, out: str, dtype: str, max_shard_bytes: int, naming: str) -> dict:
    import torch
    from tqdm import tqdm

    from srft_mcore.models.bridge import mcore_to_hf
    from srft_mcore.models.name_map import Dims, checkpoint_renames, expected_hf_shapes, lookup
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model
    from srft_mcore.models.builder import DTYPES
    from tools.convert_ckpt.safetensors_out import StreamingSafetensorsWriter

    init_distributed(tp=1, pp=1)
    meta = read_bridge_meta(ckpt)
    hf = load_hf_config(os.path.join(ckpt, HF_SUBDIR))
    with torch.device("meta"):
        model = build_model(hf, ModelConfig(dtype=meta["dtype"], transformer_impl="local"),
                            ParallelConfig(tp=1, pp=1), pre_process=True, post_process=True)
    sharded = model.sharded_state_dict()
    renames = checkpoint_renames(hf, naming)
    reader = _RegionReader(ckpt)
    out_dtype = DTYPES[dtype]
    load_dtype = DTYPES[meta["dtype"]]
    dims = Dims.from_hf(hf)
    plan = [(n, s, out_dtype) for n, s in expected_hf_shapes(hf).items()]
    writer = StreamingSafetensorsWriter(out, plan, max_shard_bytes)
    bar = tqdm(total=len(plan), desc="mcore -> hf", unit="tensor")
    nbytes = 0
    try:
        for names in _layer_groups(model):  # one layer in memory at a time
            for name in names:
                tm, layer = lookup(hf, name)
                sh = sharded[name]
                parts = reader.read(_regions(sh, dims.vocab, tm.layout == "vocab", renames),
                                    load_dtype)
                full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                for hf_name, t in mcore_to_hf(tm, layer, full, dims):
                    writer.write(hf_name, t.to(out_dtype))
                    nbytes += t.numel() * out_dtype.itemsize
                    bar.update(1)
                del parts, full
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return {"tensors": len(plan), "bytes_written": nbytes, "shards": len(writer.files)}


def _finish_side_files(ckpt: str, out: str, dtype: str) -> None:
    copy_side_files(os.path.join(ckpt, HF_SUBDIR), out)
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    gen_path = os.path.join(out, "generation_config.json")
    if not os.path.isfile(gen_path):
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        with open(gen_path, "w") as f:
            json.dump(gen, f, indent=2)


def mcore_to_hf(ckpt: str, out: str, dtype: Optional[str] = None, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                timeout_s: float = 24 * 3600.0) -> dict:
    """Convert; ``dtype`` defaults to the dtype of the original HF checkpoint. The checkpoint
    may name its tensors as either layer spec writes them (see
    :func:`srft_mcore.models.name_map.checkpoint_naming`); other names fail here, before any
    rank."""
    from srft_mcore.models.name_map import checkpoint_naming
    from srft_mcore.training.checkpoint import stored_keys
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import get_architecture
    from srft_mcore.models.builder import DTYPES

    check_output_dir(out, overwrite)
    meta = read_bridge_meta(ckpt)
    hf = load_hf_config(os.path.join(ckpt, HF_SUBDIR))
    get_architecture(hf)
    try:
        keys = stored_keys(ckpt)
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a DCP .metadata
        raise CheckpointFormatError(f"{ckpt!r}: its dist checkpoint metadata (.metadata) cannot "
                                    f"be read ({type(e).__name__}: {e})") from e
    naming = checkpoint_naming(hf, keys, where=f"checkpoint {ckpt!r}")
    dtype = dtype or meta.get("source_dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        res = spawn_ranks(_rank_main, 1,
                          (os.path.abspath(ckpt), tmp, dtype, max_shard_bytes, naming),
                          timeout_s=timeout_s)[0]
        _finish_side_files(ckpt, tmp, dtype)
    res.update(out=os.path.abspath(out), dtype=dtype, checkpoint_naming=naming,
               seconds=round(time.time() - t0, 3))
    return res
