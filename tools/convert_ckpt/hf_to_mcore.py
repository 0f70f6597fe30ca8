"""HF checkpoint -> Megatron ``dist_checkpointing`` checkpoint (loadable at any TP/PP).

``tp * pp`` spawned gloo ranks each build their stage of the model on the ``meta`` device
and write its shards with :func:`tools.convert_ckpt.dcp_stream.save_streaming`: the same
checkpoint ``dist_checkpointing.save`` writes, but each tensor (this rank's slice of the HF
tensors, :func:`srft_mcore.models.bridge.hf_param_shard`) is read from the HF files just before it
is written, with the source file mapped only during that read. Peak memory per rank is
about one parameter shard. The HF side files needed to go back (config.json,
generation config, tokenizer) go to ``<out>/hf/`` and the conversion record to
``<out>/srft_bridge.json``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from tools.convert_ckpt.outdir import atomic_output_dir, check_output_dir, copy_side_files

BRIDGE_META = "srft_bridge.json"
HF_SUBDIR = "hf"


def source_dtype(hf: dict) -> str:
    """The HF checkpoint's dtype as a ModelConfig name (bfloat16 when config.json is silent)."""
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16",
            "fp32": "float32"}.get(name, name)


def _rank_main(hf_dir: str, out: str, tp: int, pp: int, dtype: str) -> dict:
    import torch

    from srft_mcore.models.bridge import HFCheckpoint, hf_param_shard
    from srft_mcore.models.name_map import Dims
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model
    from tools.convert_ckpt.dcp_stream import save_streaming

    layout = init_distributed(tp=tp, pp=pp)
    hf = load_hf_config(hf_dir)
    with torch.device("meta"):  # shapes and sharding only; the weights are never all here
        model = build_model(hf, ModelConfig(dtype=dtype, transformer_impl="local"),
                            ParallelConfig(tp=tp, pp=pp))
    src = HFCheckpoint(hf_dir, hf, keep_open=False)
    dims = Dims.from_hf(hf)
    params = dict(model.named_parameters())
    stats = {"tensors": 0, "bytes": 0}

    def load(name: str) -> torch.Tensor:
        p = params[name]
        shard = hf_param_shard(model, name, p.shape, src, hf, dims, tp, layout.tp_rank)
        stats["tensors"] += 1
        stats["bytes"] += shard.numel() * shard.element_size()
        return shard.to(p.dtype)

    save_streaming(model.sharded_state_dict(), out, load, params, progress=layout.rank == 0)
    return {"rank": layout.rank, "padded_vocab_size": int(model.vocab_size), **stats}


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                overwrite: bool = False, timeout_s: float = 24 * 3600.0) -> dict:
    """Convert; returns a summary dict. Validates everything it can before any rank starts."""
    from srft_mcore.models.bridge import HFCheckpoint
    from srft_mcore.models.name_map import BridgeError, check_tp
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import get_architecture

    check_output_dir(out, overwrite)
    hf = load_hf_config(hf_dir)
    get_architecture(hf)
    check_tp(hf, tp)
    if pp < 1 or pp > hf["num_hidden_layers"]:
        raise BridgeError(f"pipeline size {pp} must be between 1 and num_hidden_layers="
                          f"{hf['num_hidden_layers']}")
    HFCheckpoint(hf_dir, hf)  # missing / truncated shards, names, shapes, dtypes
    dtype = dtype or source_dtype(hf)
    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        ranks = spawn_ranks(_rank_main, tp * pp, (os.path.abspath(hf_dir), tmp, tp, pp, dtype),
                            timeout_s=timeout_s)
        copy_side_files(hf_dir, os.path.join(tmp, HF_SUBDIR))
        meta = {"format": "srft_mcore dist_checkpointing", "version": 1,
                "model_type": hf["model_type"], "source": os.path.abspath(hf_dir),
                "tp": tp, "pp": pp, "dtype": dtype, "source_dtype": source_dtype(hf),
                "vocab_size": hf["vocab_size"],
                "padded_vocab_size": ranks[0]["padded_vocab_size"],
                "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}
        with open(os.path.join(tmp, BRIDGE_META), "w") as f:
            json.dump(meta, f, indent=2)
    meta.update(out=os.path.abspath(out), seconds=round(time.time() - t0, 3),
                bytes_read=sum(r["bytes"] for r in ranks))
    return meta
