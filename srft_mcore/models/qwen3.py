"""Qwen3 dense family: per-head q/k RMSNorm before RoPE, no qkv bias, GQA, RoPE, RMSNorm,
SwiGLU, ``head_dim`` given separately from ``hidden_size / num_attention_heads``, tied or
untied embeddings.

Megatron builds the q/k norms with ``qk_layernorm=True`` (``Architecture.qk_norm``); they are
``head_dim`` wide and named alike under the local and the Transformer Engine layer specs.
``attention_bias=True`` adds the q/k/v bias rows (an ``o_proj`` bias is not supported and is
reported as an unmapped tensor, as for Llama).
"""
from srft_mcore.models.arch import Architecture, TensorMap

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

TENSORS = (
    TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorMap(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "replicated",
              te_mcore=_L + "self_attention.linear_qkv.layer_norm_weight"),
    TensorMap(_L + "self_attention.linear_qkv.weight",
              (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
               _H + "self_attn.v_proj.weight"), "qkv"),
    TensorMap(_L + "self_attention.linear_qkv.bias",
              (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias",
               _H + "self_attn.v_proj.bias"), "qkv", when="qkv_bias"),
    TensorMap(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
              "replicated", size="head_dim"),
    TensorMap(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
              "replicated", size="head_dim"),
    TensorMap(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row"),
    TensorMap(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
              "replicated", te_mcore=_L + "mlp.linear_fc1.layer_norm_weight"),
    TensorMap(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
              "gate_up"),
    TensorMap(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row"),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

QWEN3 = Architecture(model_type="qwen3", hf_class="Qwen3ForCausalLM",
                     qkv_bias=lambda cfg: bool(cfg.get("attention_bias", False)),
                     tensors=TENSORS, qk_norm=True)
