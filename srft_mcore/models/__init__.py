"""Model construction: architecture registry, HF config -> Megatron GPTModel, tiny models.

The names below load on first use, so that importing a light submodule (``registry``,
``tiny``) does not import torch and Megatron (a model's config.json is read by
:mod:`srft_mcore.config.hf_config`)."""
import importlib

_NAMES = {"ARCHITECTURES": "srft_mcore.models.registry",
          "UnsupportedArchitecture": "srft_mcore.models.registry",
          "get_architecture": "srft_mcore.models.registry",
          "build_model": "srft_mcore.models.builder",
          "make_transformer_config": "srft_mcore.models.builder",
          "padded_vocab_size": "srft_mcore.models.builder"}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'srft_mcore.models' has no attribute {name!r}")
