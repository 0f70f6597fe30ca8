"""Architecture registry: HF ``model_type`` -> how to build the Megatron model.

Each supported family (``qwen2.py``, ``llama.py``) registers one :class:`Architecture`,
chosen by the exact ``model_type`` of the HF ``config.json`` (never by substring). The HF
<-> Megatron tensor-name table of a family lives beside it and is used by the bridge
(conversion, start-up loading and weight sync alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

ARCHITECTURES: dict = {}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    model_type: str
    """HF config ``model_type``."""
    hf_class: str
    """transformers class name in ``architectures``."""
    qkv_bias: Callable[[dict], bool]
    """Whether q/k/v projections carry a bias, from the HF config."""
    extra: dict = field(default_factory=dict)


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.model_type] = arch
    return arch


def get_architecture(hf_config: dict) -> Architecture:
    from srft_mcore.models import llama, qwen2  # noqa: F401  (registers the families)

    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} (architectures={hf_config.get('architectures')}) is not "
            f"supported. Supported model types: {', '.join(sorted(ARCHITECTURES))} "
            f"(Qwen2/Qwen2.5 and Llama families)")
    return ARCHITECTURES[model_type]
