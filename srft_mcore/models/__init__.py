"""Model construction: architecture registry, HF config -> Megatron GPTModel, tiny models."""
from srft_mcore.models.arch import ARCHITECTURES, UnsupportedArchitecture, get_architecture
from srft_mcore.models.builder import (build_model, load_hf_config, make_transformer_config,
                                       padded_vocab_size)

__all__ = ["ARCHITECTURES", "UnsupportedArchitecture", "get_architecture", "build_model",
           "load_hf_config", "make_transformer_config", "padded_vocab_size"]
