"""HF ``config.json`` -> Megatron ``TransformerConfig`` + layer spec + ``GPTModel`` (per PP stage).

Which layer spec and which fused kernels a build uses is decided once, by the pure function
:func:`choose_build`, from what :func:`detect_kernels` finds importable at run time: a fused
kernel is switched on only when the module that provides it imports on this machine, so a GPU
without transformer-engine or apex builds the local spec with plain torch ops.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from srft_mcore.config import ConfigError, ModelConfig, ParallelConfig
from srft_mcore.config.hf_config import rope_scaling, rope_theta, with_overrides
from srft_mcore.models.registry import get_architecture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# --------------------------------------------------------------------------- spec and fusions
@dataclass(frozen=True)
class Kernels:
    """The optional GPU kernels that import on this machine."""

    cuda: bool = False
    transformer_engine: bool = False
    """``transformer_engine.pytorch`` imports (TE layer spec)."""
    te_fused_rope: bool = False
    """Megatron finds TE's fused RoPE (``apply_rope_fusion``)."""
    apex_softmax: bool = False
    """apex's scaled (upper-triangular) masked-softmax CUDA extensions import
    (``masked_softmax_fusion`` of the local attention)."""
    triton: bool = False
    """torch.compile can emit GPU kernels: Megatron's jit-fused bias-SwiGLU and
    bias-dropout-add are ``torch.compile``'d functions."""
    apex_wgrad: bool = False
    """apex's ``fused_weight_gradient_mlp_cuda`` imports: megatron-core's own linear layers
    (the local spec's, and the output layer under either spec) refuse
    ``gradient_accumulation_fusion`` without it."""


def _imports(*modules: str) -> bool:
    """Every module imports (a CUDA extension built for another torch raises OSError or
    RuntimeError rather than ImportError, and counts as absent too)."""
    try:
        for name in modules:
            importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure means the kernel is unusable here
        return False


def detect_kernels() -> Kernels:
    """What this machine has; everything is off without CUDA."""
    if not torch.cuda.is_available():
        return Kernels()
    te = _imports("transformer_engine.pytorch")
    fused_rope = False
    if te:
        from megatron.core.models.common.embeddings import rope_utils

        fused_rope = rope_utils.fused_apply_rotary_pos_emb is not None
    return Kernels(cuda=True, transformer_engine=te, te_fused_rope=fused_rope,
                   apex_softmax=_imports("scaled_upper_triang_masked_softmax_cuda",
                                         "scaled_masked_softmax_cuda"),
                   triton=_imports("triton"),
                   apex_wgrad=_imports("fused_weight_gradient_mlp_cuda"))


@dataclass(frozen=True)
class BuildChoice:
    """The layer spec and the ``TransformerConfig`` fusion flags of one build."""

    spec: str
    """``transformer_engine`` | ``local``."""
    fusions: dict
    """TransformerConfig field -> on/off."""
    why_off: dict = field(default_factory=dict)
    """Fusion -> why it is off (for the log line)."""

    def describe(self) -> str:
        on = [k for k, v in self.fusions.items() if v]
        off = [f"{k} ({self.why_off.get(k, 'off')})" for k, v in self.fusions.items() if not v]
        return (f"model build: {self.spec} layer spec; fusions on: {', '.join(on) or 'none'}; "
                f"off: {', '.join(off) or 'none'}")


def choose_spec(impl: str, kernels: Kernels, sequence_parallel: bool = False) -> str:
    """``model.transformer_impl`` -> the layer spec this machine can build."""
    have_te = kernels.cuda and kernels.transformer_engine
    if impl == "transformer_engine" and not have_te:
        raise ConfigError(
            "config error: model.transformer_impl='transformer_engine', but "
            f"{'transformer-engine does not import' if kernels.cuda else 'CUDA is absent'}. "
            "Fix: install transformer-engine on a GPU machine (see the Dockerfile) or use "
            "model.transformer_impl=auto|local")
    spec = "transformer_engine" if impl != "local" and have_te else "local"
    if sequence_parallel and spec == "local":
        raise ConfigError(
            "config error: parallel.sequence_parallel=True needs the transformer-engine layer "
            "spec (the local spec's torch RMSNorm has no sequence-parallel support), and this "
            f"build uses the local spec (model.transformer_impl={impl!r}). Fix: set "
            "parallel.sequence_parallel=false, or run where transformer-engine imports with "
            "model.transformer_impl=auto")
    return spec


def choose_build(impl: str, kernels: Kernels, sequence_parallel: bool = False,
                 ddp: bool = False) -> BuildChoice:
    """Pure decision: the spec and each fusion, on only when its kernel imports.

    ddp: the model will be wrapped in Megatron's DDP (the trained policy), whose fp32
    ``main_grad`` buffers the fused weight-gradient accumulation writes into.
    """
    spec = choose_spec(impl, kernels, sequence_parallel)
    why = {}

    def flag(name: str, ok: bool, reason: str) -> bool:
        if not ok:
            why[name] = reason
        return ok

    no_gpu = "no CUDA"
    compiled = kernels.cuda and kernels.triton
    fusions = {
        "bias_activation_fusion": flag("bias_activation_fusion", compiled,
                                       "needs CUDA + triton" if kernels.cuda else no_gpu),
        "bias_dropout_fusion": flag("bias_dropout_fusion", compiled,
                                    "needs CUDA + triton" if kernels.cuda else no_gpu),
        "masked_softmax_fusion": flag("masked_softmax_fusion",
                                      kernels.cuda and kernels.apex_softmax,
                                      "apex softmax kernels absent" if kernels.cuda else no_gpu),
        "apply_rope_fusion": flag("apply_rope_fusion",
                                  spec == "transformer_engine" and kernels.te_fused_rope,
                                  "needs transformer-engine's fused RoPE"),
        # apex's persistent kernel is LayerNorm-only (these families use RMSNorm) and the
        # local spec's torch norm asserts against the flag
        "persist_layer_norm": flag("persist_layer_norm", False, "RMSNorm models"),
        # accumulates weight gradients straight into Megatron DDP's fp32 main_grad (no bf16
        # grad tensor, no separate add): only for the DDP-wrapped policy; the TE spec's layers
        # fuse it themselves, but megatron-core's output layer (a ColumnParallelLinear under
        # either spec) refuses the flag unless apex's wgrad kernel imports
        "gradient_accumulation_fusion": flag(
            "gradient_accumulation_fusion", kernels.cuda and ddp and kernels.apex_wgrad,
            no_gpu if not kernels.cuda else "needs a DDP-wrapped model" if not ddp
            else "apex's fused_weight_gradient_mlp_cuda absent"),
    }
    return BuildChoice(spec=spec, fusions=fusions, why_off=why)


def _log0(msg: str) -> None:
    """One line on rank 0, to stderr: tools print their JSON results on stdout."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[srft] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model
def make_transformer_config(hf: dict, model_cfg: ModelConfig, par: ParallelConfig,
                            choice: Optional[BuildChoice] = None):
    """The ``TransformerConfig`` of ``hf`` (fusions from ``choice``; default: this machine)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if choice is None:
        choice = choose_build(model_cfg.transformer_impl, detect_kernels(), par.sequence_parallel)
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
        qk_layernorm=arch.qk_norm,
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
        batch_p2p_sync=on_gpu,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method="uniform" if model_cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute_granularity == "full" else None,
        **choice.fusions,
    )


def layer_spec(choice: BuildChoice, tconfig):
    """The decoder spec: TE's layer spec, or the local layer spec wrapped in a block spec
    whose final norm is the layers' own torch RMSNorm (Megatron's default final norm is
    apex's FusedLayerNorm when apex imports, which refuses RMSNorm). Both specs build the
    per-head q/k norms only when asked (``qk_layernorm``), whatever the config says."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    if choice.spec == "transformer_engine":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=tconfig.qk_layernorm)
    layer = specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                           qk_layernorm=tconfig.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(tconfig),
                                      layer_norm=layer.submodules.input_layernorm)


def gpt_model_kwargs(hf: dict, model_cfg: ModelConfig, par: ParallelConfig) -> dict:
    """``GPTModel`` arguments that come from the HF config (with the ``model.*`` overrides)."""
    hf = with_overrides(hf, model_cfg)
    kwargs = dict(
        vocab_size=padded_vocab_size(hf["vocab_size"], model_cfg.make_vocab_size_divisible_by,
                                     par.tp),
        max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf),
    )
    scaling = rope_scaling(hf)
    if scaling is not None:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"rope scaling {scaling} is not supported; supported: llama3")
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return kwargs


def unwrap_gpt(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_model(hf: dict, model_cfg: ModelConfig, par: ParallelConfig,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                kernels: Optional[Kernels] = None, ddp: bool = False):
    """Build this rank's ``GPTModel`` stage from a HF config dict (weights not loaded).

    ``kernels`` (default: :func:`detect_kernels`) decides the layer spec and the fusions;
    ``ddp``: the caller wraps the model in Megatron's DDP (see :func:`choose_build`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    choice = choose_build(model_cfg.transformer_impl,
                          detect_kernels() if kernels is None else kernels,
                          par.sequence_parallel, ddp=ddp)
    _log0(choice.describe())
    tconfig = make_transformer_config(hf, model_cfg, par, choice)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(choice, tconfig),
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True,
        **gpt_model_kwargs(hf, model_cfg, par),
    )
    # the local spec's torch norms ignore params_dtype and stay fp32; Megatron's mixed-precision
    # optimizer (and its checkpoint param map) expects one dtype, as Megatron-LM's Float16Module
    # and the TE spec give it: cast the whole stage
    model.to(dtype=tconfig.params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
