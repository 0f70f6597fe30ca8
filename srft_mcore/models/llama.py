"""Llama family (Llama 2/3): GQA, RoPE, RMSNorm, SwiGLU, optional attention bias."""
from srft_mcore.models.arch import Architecture
from srft_mcore.models.qwen2 import TENSORS

# Llama's HF checkpoint layout is Qwen2's (q/k/v, gate/up, norms, lm_head unless tied), so the
# table is shared; the q/k/v bias rows apply only with attention_bias=True (o_proj bias is
# not supported and is reported as an unmapped tensor).
LLAMA = Architecture(model_type="llama", hf_class="LlamaForCausalLM",
                     qkv_bias=lambda cfg: bool(cfg.get("attention_bias", False)),
                     tensors=TENSORS)
