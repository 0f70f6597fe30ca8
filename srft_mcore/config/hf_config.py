"""A HF model's ``config.json``: reading it, its RoPE settings and context length, and the
``model.*`` overrides of them. Plain dicts, no torch: ``validate`` checks a run against them
before any rank starts, and the model builder and the SGLang servers read the same values."""
from __future__ import annotations

import json
import os
from typing import Optional

from srft_mcore.config.schema import ModelConfig

CONTEXT_KEYS = ("max_sequence_length", "seq_length", "max_seq_len", "model_max_length",
                "max_position_embeddings")
"""HF config keys holding the context length, in the order SGLang reads them."""


def load_hf_config(path: str) -> dict:
    """Read ``config.json`` from a HF model directory, with a clear error when absent."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json at {path!r}: model.hf_path must be a Hugging Face "
                                f"model directory (config.json, tokenizer, *.safetensors)")
    with open(cfg_path) as f:
        return json.load(f)


def rope_theta(hf: dict) -> float:
    """RoPE base; transformers 5.x keeps it in ``rope_parameters``, 4.x at the top level."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def rope_scaling(hf: dict) -> Optional[dict]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in (None, "default") else params


def with_overrides(hf: dict, model_cfg: ModelConfig) -> dict:
    """A copy of the HF config with ``model.rope_theta`` / ``model.max_position_embeddings``
    applied: the model the trainer builds and the one SGLang serves (see
    ``rollout/server.py:context_server_args``) both read these values."""
    out = dict(hf)
    theta = getattr(model_cfg, "rope_theta", None)
    if theta is not None:
        out["rope_theta"] = float(theta)
        if isinstance(hf.get("rope_parameters"), dict):
            out["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": float(theta)}
    positions = getattr(model_cfg, "max_position_embeddings", None)
    if positions is not None:
        out["max_position_embeddings"] = int(positions)
    return out


def context_limit(hf: dict) -> Optional[int]:
    """Tokens (prompt + response) the model takes: its context key times the RoPE scaling
    factor, derived as SGLang derives its default ``--context-length`` (llama3 scaling and
    configs with ``original_max_position_embeddings`` already count the scaling). None when
    the config names no context length."""
    base = next((hf[k] for k in CONTEXT_KEYS if hf.get(k) is not None), None)
    if base is None:
        return None
    scaling = rope_scaling(hf) or {}
    factor = 1.0
    if (scaling and scaling.get("rope_type", scaling.get("type")) != "llama3"
            and "original_max_position_embeddings" not in scaling):
        factor = float(scaling.get("factor", 1.0))
    return int(base * factor)

