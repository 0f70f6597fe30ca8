"""HF ``config.json`` -> Megatron ``TransformerConfig`` + layer spec + ``GPTModel`` (per PP stage)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from srft_mcore.config import ModelConfig, ParallelConfig
from srft_mcore.models.arch import get_architecture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_config(path: str) -> dict:
    """Read ``config.json`` from a HF model directory, with a clear error when absent."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json at {path!r}: model.hf_path must be a Hugging Face "
                                f"model directory (config.json, tokenizer, *.safetensors)")
    with open(cfg_path) as f:
        return json.load(f)


def rope_theta(hf: dict) -> float:
    """RoPE base; transformers 5.x keeps it in ``rope_parameters``, 4.x at the top level."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def rope_scaling(hf: dict) -> Optional[dict]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in (None, "default") else params


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def pipeline_layout(pp_layer_split: Optional[list]) -> Optional[str]:
    """[3, 5] -> 'Ettt|tttttL' (Megatron's layout string: E embedding, t layer, L loss)."""
    if not pp_layer_split:
        return None
    stages = ["t" * n for n in pp_layer_split]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "L"
    return "|".join(stages)


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    impl = model_cfg.transformer_impl
    if impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = torch.cuda.is_available()
    except ImportError:
        have_te = False
    if impl == "transformer_engine" and not have_te:
        raise RuntimeError("model.transformer_impl=transformer_engine, but transformer-engine "
                           "does not import or CUDA is absent. Fix: install transformer-engine "
                           "on a GPU machine (see Dockerfile) or use model.transformer_impl=local")
    return have_te


def make_transformer_config(hf: dict, model_cfg: ModelConfig, par: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = get_architecture(hf)
    dtype = DTYPES[model_cfg.dtype]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        add_bias_linear=bool(hf.get("mlp_bias", False)),
        add_qkv_bias=arch.qkv_bias(hf),
        gated_linear_unit=True,
        activation_func=F.silu,
        rotary_interleaved=False,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel,
        pipeline_model_parallel_layout=pipeline_layout(par.pp_layer_split),
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # fused kernels exist only on GPU
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        batch_p2p_sync=on_gpu,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method="uniform" if model_cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute_granularity == "full" else None,
    )


def layer_spec(model_cfg: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_transformer_engine(model_cfg):
        return specs.get_gpt_layer_with_transformer_engine_spec()
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def unwrap_gpt(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_model(hf: dict, model_cfg: ModelConfig, par: ParallelConfig,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    """Build this rank's ``GPTModel`` stage from a HF config dict (weights not loaded)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tconfig = make_transformer_config(hf, model_cfg, par)
    scaling = rope_scaling(hf)
    kwargs = {}
    if scaling is not None:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"rope scaling {scaling} is not supported; supported: llama3")
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(model_cfg),
        vocab_size=padded_vocab_size(hf["vocab_size"], model_cfg.make_vocab_size_divisible_by,
                                     par.tp),
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf),
        **kwargs,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
