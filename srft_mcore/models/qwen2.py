"""Qwen2 / Qwen2.5 family: qkv bias, GQA, RoPE, RMSNorm, SwiGLU, tied or untied embeddings."""
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
    TensorMap(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row"),
    TensorMap(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
              "replicated", te_mcore=_L + "mlp.linear_fc1.layer_norm_weight"),
    TensorMap(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
              "gate_up"),
    TensorMap(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row"),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

QWEN2 = Architecture(model_type="qwen2", hf_class="Qwen2ForCausalLM",
                     qkv_bias=lambda cfg: True, tensors=TENSORS)
