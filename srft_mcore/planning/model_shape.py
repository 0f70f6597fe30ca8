"""The model side of the planner: size presets, a model's shape from its HF config, and
its parameter counts (whole model, per layer, per TP rank and pipeline stage).

Symbols: h hidden size, L layers, a attention heads, g key/value heads, d head dim, f MLP
intermediate size, V vocabulary (Megatron pads it to a multiple of 128 * TP), t tensor
parallel size, p pipeline stages.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional


# --------------------------------------------------------------------------- presets
_QWEN25 = dict(model_type="qwen2", vocab_size=152064, tie_word_embeddings=False)
_QWEN25_SMALL = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
_QWEN3 = dict(model_type="qwen3", head_dim=128, vocab_size=151936)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, tie_word_embeddings=False,
               attention_bias=False)


def _preset(base: dict, h: int, layers: int, heads: int, kv: int, ffn: int, **extra) -> dict:
    return {**base, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, **extra}


PRESETS = {
    # name: the HF config.json values that decide sizes (published configs of each model)
    "qwen2.5-0.5b": _preset(_QWEN25_SMALL, 896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": _preset(_QWEN25_SMALL, 1536, 28, 12, 2, 8960),
    "qwen2.5-3b": _preset(_QWEN25_SMALL, 2048, 36, 16, 2, 11008),
    "qwen2.5-7b": _preset(_QWEN25, 3584, 28, 28, 4, 18944),
    "qwen2.5-14b": _preset(_QWEN25, 5120, 48, 40, 8, 13824),
    "qwen2.5-32b": _preset(_QWEN25, 5120, 64, 40, 8, 27648),
    "qwen2.5-72b": _preset(_QWEN25, 8192, 80, 64, 8, 29568),
    "qwen3-0.6b": _preset(_QWEN3, 1024, 28, 16, 8, 3072, tie_word_embeddings=True),
    "qwen3-1.7b": _preset(_QWEN3, 2048, 28, 16, 8, 6144, tie_word_embeddings=True),
    "qwen3-4b": _preset(_QWEN3, 2560, 36, 32, 8, 9728, tie_word_embeddings=True),
    "qwen3-8b": _preset(_QWEN3, 4096, 36, 32, 8, 12288, tie_word_embeddings=False),
    "qwen3-14b": _preset(_QWEN3, 5120, 40, 40, 8, 17408, tie_word_embeddings=False),
    "qwen3-32b": _preset(_QWEN3, 5120, 64, 64, 8, 25600, tie_word_embeddings=False),
    "llama3-8b": _preset(_LLAMA3, 4096, 32, 32, 8, 14336),
    "llama3-70b": _preset(_LLAMA3, 8192, 80, 64, 8, 28672),
}
ALIASES = {"llama-3-8b": "llama3-8b", "llama-3-70b": "llama3-70b",
           "llama3.1-8b": "llama3-8b", "llama3.1-70b": "llama3-70b"}


class PlanError(ValueError):
    """A bad planner input; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense decoder (Qwen2/Qwen2.5, Qwen3, Llama) that memory depends on."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    """q/k/v projections carry biases (Qwen2; Llama with attention_bias)."""
    qk_norm: bool
    """RMSNorm over each query and key head (Qwen3)."""
    o_bias: bool = False
    """The output projection carries a bias (Llama/Qwen3 with attention_bias)."""
    mlp_bias: bool = False
    """gate/up/down carry biases (Llama with mlp_bias)."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


SUPPORTED_TYPES = ("qwen2", "qwen3", "llama")


def shape_from_hf(hf: dict, name: str = "model") -> ModelShape:
    """A :class:`ModelShape` from a HF ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise PlanError(f"model_type {model_type!r} is not supported by the planner. Fix: use a "
                        f"config.json of one of {', '.join(SUPPORTED_TYPES)} (dense Qwen2/"
                        f"Qwen2.5, Qwen3, Llama) or a preset: {', '.join(PRESETS)}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in hf]
    if missing:
        raise PlanError(f"config.json of {name!r} lacks {', '.join(missing)}. Fix: pass the "
                        f"model's own config.json (from its Hugging Face directory)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or attention_bias
    return ModelShape(name=name, model_type=model_type, hidden=hidden,
                      layers=int(hf["num_hidden_layers"]), heads=heads,
                      kv_heads=int(hf.get("num_key_value_heads") or heads),
                      head_dim=int(hf.get("head_dim") or hidden // heads),
                      ffn=int(hf["intermediate_size"]), vocab=int(hf["vocab_size"]),
                      tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                      qk_norm=model_type == "qwen3",
                      o_bias=model_type != "qwen2" and attention_bias,
                      mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)))


def load_model(spec: str) -> ModelShape:
    """A preset name (case-insensitive) or a path to a config.json / HF model directory."""
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in PRESETS:
        return shape_from_hf(PRESETS[key], key)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise PlanError(f"--model {spec!r} is neither a preset nor a config.json. Fix: use one "
                        f"of {', '.join(PRESETS)}, or the path of a model's config.json")
    with open(path) as f:
        return shape_from_hf(json.load(f), os.path.basename(os.path.dirname(
            os.path.abspath(path))) or spec)


# --------------------------------------------------------------------------- parameters
def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def attention_params(m: ModelShape) -> int:
    """q, k, v, o projections: h*(a*d) + 2*h*(g*d) + (a*d)*h, + (a*d + 2*g*d) q/k/v biases
    (Qwen2; attention_bias), + h for an o_proj bias (attention_bias of Llama/Qwen3), + 2*d for
    the q/k RMSNorm weights (Qwen3)."""
    n = m.hidden * m.q_dim + 2 * m.hidden * m.kv_dim + m.q_dim * m.hidden
    if m.qkv_bias:
        n += m.q_dim + 2 * m.kv_dim
    if m.o_bias:
        n += m.hidden
    if m.qk_norm:
        n += 2 * m.head_dim
    return n


def mlp_params(m: ModelShape) -> int:
    """SwiGLU: gate and up h*f each, down f*h: 3*h*f, + 2f + h biases with mlp_bias."""
    return 3 * m.hidden * m.ffn + ((2 * m.ffn + m.hidden) if m.mlp_bias else 0)


def layer_params(m: ModelShape) -> int:
    """One decoder layer: attention + MLP + two RMSNorm weights (2*h)."""
    return attention_params(m) + mlp_params(m) + 2 * m.hidden


def hf_param_count(m: ModelShape) -> int:
    """Parameters of the HF model: L layers + embeddings V*h (again for an untied lm_head)
    + the final norm h. The exact count ``sum(p.numel())`` of the transformers model."""
    embeddings = m.vocab * m.hidden * (1 if m.tied else 2)
    return m.layers * layer_params(m) + embeddings + m.hidden


def layer_params_per_rank(m: ModelShape, tp: int) -> int:
    """One layer on one TP rank: the projections (and their column-parallel biases) split
    over t; the norms (2*h, and Qwen3's 2*d q/k norms) and row-parallel biases replicated."""
    replicated = (2 * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
                  + (m.hidden if m.o_bias else 0) + (m.hidden if m.mlp_bias else 0))
    return (layer_params(m) - replicated) // tp + replicated


def stage_layers(m: ModelShape, pp: int) -> int:
    """Layers of the largest pipeline stage: ceil(L / p) (an uneven split when p does not
    divide L; Megatron's pp_layer_split)."""
    return -(-m.layers // pp)


def stage_params(m: ModelShape, tp: int, pp: int, stage: str,
                 layers: Optional[int] = None) -> int:
    """Parameters one GPU of a stage holds (Megatron layout, padded vocabulary), with
    ``layers`` decoder layers (default: the largest stage's, :func:`stage_layers`).

    first: its layers + the word embeddings V_pad*h/t; middle: its layers; last: its layers
    + the output layer V_pad*h/t (tied models keep a copy of the embeddings there when
    p > 1) + the final norm; with p = 1 one stage holds all of it (tied: the embeddings
    once)."""
    emb = padded_vocab(m.vocab, tp) * m.hidden // tp
    n = (stage_layers(m, pp) if layers is None else layers) * layer_params_per_rank(m, tp)
    if pp == 1:
        return n + emb * (1 if m.tied else 2) + m.hidden
    if stage == "first":
        return n + emb
    if stage == "middle":
        return n
    return n + emb + m.hidden  # last: output layer (or the tied copy) + final norm


def dense_matmul_params(m: ModelShape) -> int:
    """Weights that multiply every token: the layers' projections, not norms or biases."""
    return m.layers * (m.hidden * m.q_dim + 2 * m.hidden * m.kv_dim + m.q_dim * m.hidden
                       + 3 * m.hidden * m.ffn)
