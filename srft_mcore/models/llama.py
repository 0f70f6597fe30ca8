"""Llama family (Llama 2/3): GQA, RoPE, RMSNorm, SwiGLU, optional attention bias."""
from srft_mcore.models.arch import Architecture, register

LLAMA = register(Architecture(model_type="llama", hf_class="LlamaForCausalLM",
                              qkv_bias=lambda cfg: bool(cfg.get("attention_bias", False))))
