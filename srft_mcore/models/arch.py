"""Architecture descriptions: how a HF model family maps onto the Megatron model.

Each supported family (``qwen2.py``, ``qwen3.py``, ``llama.py``) defines one
:class:`Architecture`; ``registry.py`` chooses it by the exact ``model_type`` of the HF
``config.json`` (never by substring). The HF <-> Megatron tensor-name table of a family lives
beside it and is used by the bridge (conversion, start-up loading and weight sync alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

LAYOUTS = ("replicated", "vocab", "row", "qkv", "gate_up")
"""How a Megatron tensor is made from its HF tensor(s) and split over TP ranks:

* ``replicated``: same tensor, every rank holds all of it (norms; their length is the
  :class:`TensorMap` ``size``: the hidden size, or the head dim for per-head q/k norms).
* ``vocab``: rows are vocabulary entries; padded to Megatron's padded vocab (zero rows,
  trimmed on export) and split on dim 0.
* ``row``: split on the input dim 1 (``o_proj``, ``down_proj``).
* ``qkv``: ``[q; k; v]`` fused per query group ``g`` as ``[q heads of g; k_g; v_g]`` and
  split on dim 0 by whole groups (weights and biases).
* ``gate_up``: ``[gate; up]`` fused, each TP rank holding ``[gate_i; up_i]``.
"""


@dataclass(frozen=True)
class TensorMap:
    """One Megatron tensor and the HF tensor(s) it is made of. ``{i}`` is the global layer."""

    mcore: str
    """Megatron name under the local layer spec."""
    hf: tuple
    """HF tensor names, in fusion order (q, k, v / gate, up)."""
    layout: str
    """One of :data:`LAYOUTS`."""
    te_mcore: Optional[str] = None
    """Megatron name under the Transformer Engine spec, where it differs."""
    when: Optional[str] = None
    """Present only if this HF-config condition holds: ``qkv_bias`` | ``untied``."""
    size: str = "hidden"
    """``replicated`` tensors: the ``name_map.Dims`` field giving their length (``hidden`` |
    ``head_dim``)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.mcore}: layout {self.layout!r} not in {LAYOUTS}")
        if self.size not in ("hidden", "head_dim"):
            raise ValueError(f"{self.mcore}: size {self.size!r} not in ('hidden', 'head_dim')")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    """HF config ``model_type``."""
    hf_class: str
    """transformers class name in ``architectures``."""
    qkv_bias: Callable[[dict], bool]
    """Whether q/k/v projections carry a bias, from the HF config."""
    tensors: tuple = ()
    """The HF <-> Megatron name map: :class:`TensorMap` entries (embedding, layer, final)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (head_dim wide) before RoPE: Megatron's
    ``qk_layernorm`` (``self_attention.q_layernorm`` / ``k_layernorm``)."""
    extra: dict = field(default_factory=dict)

    def condition(self, name: Optional[str], hf_config: dict) -> bool:
        if name is None:
            return True
        if name == "qkv_bias":
            return self.qkv_bias(hf_config)
        if name == "untied":
            return not hf_config.get("tie_word_embeddings", False)
        raise ValueError(f"unknown tensor-map condition {name!r}")
