"""Qwen2 / Qwen2.5 family: qkv bias, GQA, RoPE, RMSNorm, SwiGLU, tied or untied embeddings."""
from srft_mcore.models.arch import Architecture, register

QWEN2 = register(Architecture(model_type="qwen2", hf_class="Qwen2ForCausalLM",
                              qkv_bias=lambda cfg: True))
