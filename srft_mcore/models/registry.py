"""The supported model families, chosen by the exact ``model_type`` of a HF ``config.json``.

Torch-free: a launcher checks the model's architecture before any rank starts."""
from __future__ import annotations

from srft_mcore.models.arch import Architecture
from srft_mcore.models.llama import LLAMA
from srft_mcore.models.qwen2 import QWEN2
from srft_mcore.models.qwen3 import QWEN3

ARCHITECTURES: dict = {arch.model_type: arch for arch in (QWEN2, LLAMA, QWEN3)}


class UnsupportedArchitecture(ValueError):
    pass


def get_architecture(hf_config: dict) -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} (architectures={hf_config.get('architectures')}) is not "
            f"supported. Supported model types: {', '.join(sorted(ARCHITECTURES))} "
            f"(Qwen2/Qwen2.5, Qwen3 dense and Llama families)")
    return ARCHITECTURES[model_type]
