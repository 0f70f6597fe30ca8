"""Layer spec and fused kernels follow what imports on the machine: a GPU without
transformer-engine or apex builds the local spec with every TE/apex fusion off.

The decision is the pure function ``choose_build(impl, Kernels(...))``, so a "GPU" is
simulated on CPU by passing ``Kernels(cuda=True, ...)``; a ``gpu`` test builds and runs the
model on CUDA with the kernels really detected."""
import math

import pytest
import torch

from srft_mcore.config import ConfigError, ModelConfig, ParallelConfig
from srft_mcore.launching.local import spawn_ranks
from srft_mcore.models.builder import (Kernels, choose_build, detect_kernels, gpt_model_kwargs,
                                       make_transformer_config)
from srft_mcore.doctor.parallel_check import TINY_QWEN2

TE_APEX_FUSIONS = ("masked_softmax_fusion", "persist_layer_norm", "apply_rope_fusion",
                   "gradient_accumulation_fusion")
GPU_BARE = Kernels(cuda=True, triton=True)  # CUDA + torch.compile, no TE, no apex
GPU_FULL = Kernels(cuda=True, transformer_engine=True, te_fused_rope=True, apex_softmax=True,
                   triton=True)


def test_gpu_without_te_or_apex_gets_the_local_spec_and_no_te_apex_fusion():
    choice = choose_build("auto", GPU_BARE)
    assert choice.spec == "local"
    assert not any(choice.fusions[f] for f in TE_APEX_FUSIONS), choice.fusions
    # torch.compile'd Megatron fusions need only CUDA + triton
    assert choice.fusions["bias_activation_fusion"] and choice.fusions["bias_dropout_fusion"]
    line = choice.describe()
    assert "\n" not in line and line.startswith("model build: local layer spec")
    assert "masked_softmax_fusion (apex softmax kernels absent)" in line


def test_each_fusion_needs_its_own_kernel():
    assert choose_build("auto", Kernels(cuda=True)).fusions["bias_activation_fusion"] is False
    apex_only = choose_build("auto", Kernels(cuda=True, apex_softmax=True, triton=True))
    assert apex_only.spec == "local" and apex_only.fusions["masked_softmax_fusion"]
    full = choose_build("auto", GPU_FULL)
    assert full.spec == "transformer_engine"
    assert full.fusions["apply_rope_fusion"] and full.fusions["masked_softmax_fusion"]
    assert not full.fusions["persist_layer_norm"]  # LayerNorm-only kernel; these are RMSNorm
    # TE without its fused RoPE (older TE): TE spec, RoPE unfused
    assert not choose_build("auto", Kernels(cuda=True, transformer_engine=True)).fusions[
        "apply_rope_fusion"]


@pytest.mark.parametrize("impl", ["auto", "local"])
def test_gradient_accumulation_fusion_only_for_the_ddp_policy_with_the_wgrad_kernel(impl):
    """On for the DDP-wrapped policy when CUDA and apex's wgrad kernel are there (the TE
    spec fuses in its own layers; megatron-core's output layer needs apex's kernel under
    either spec); off, with the reason, for models without DDP or without the kernel."""
    with_wgrad = Kernels(cuda=True, transformer_engine=True, te_fused_rope=True,
                         apex_softmax=True, triton=True, apex_wgrad=True)
    on = choose_build(impl, with_wgrad, ddp=True)
    assert on.fusions["gradient_accumulation_fusion"] is True
    assert on.spec == ("transformer_engine" if impl == "auto" else "local")
    cases = {(with_wgrad, False): "needs a DDP-wrapped model",
             (GPU_FULL, True): "apex's fused_weight_gradient_mlp_cuda absent",
             (Kernels(apex_wgrad=True), True): "no CUDA"}
    for (kernels, ddp), reason in cases.items():
        off = choose_build(impl, kernels, ddp=ddp)
        assert off.fusions["gradient_accumulation_fusion"] is False
        assert f"gradient_accumulation_fusion ({reason})" in off.describe()
    if impl == "local":  # (the TE choice's RoPE fusion cannot be configured without TE)
        tconfig = make_transformer_config(TINY_QWEN2, ModelConfig(), ParallelConfig(), on)
        assert tconfig.gradient_accumulation_fusion is True


def test_local_impl_uses_no_te_kernel_even_when_te_imports():
    choice = choose_build("local", GPU_FULL)
    assert choice.spec == "local" and not choice.fusions["apply_rope_fusion"]


def test_cpu_gets_nothing_fused():
    assert detect_kernels() == Kernels()  # this machine has no CUDA
    choice = choose_build("auto", Kernels())
    assert choice.spec == "local" and not any(choice.fusions.values())


@pytest.mark.parametrize("impl, kernels, sp, match", [
    ("transformer_engine", GPU_BARE, False, r"transformer_engine'.*does not import.*Fix:"),
    ("transformer_engine", Kernels(), False, r"CUDA is absent.*Fix:"),
    ("auto", GPU_BARE, True, r"sequence_parallel=True needs the transformer-engine.*Fix:"),
    ("local", GPU_FULL, True, r"sequence_parallel=True.*Fix:"),
])
def test_impossible_requests_fail_with_a_fix(impl, kernels, sp, match):
    with pytest.raises(ConfigError, match=match):
        choose_build(impl, kernels, sequence_parallel=sp)
    assert choose_build("auto", GPU_FULL, sequence_parallel=True).spec == "transformer_engine"


def test_transformer_config_takes_the_flags_of_the_choice():
    choice = choose_build("auto", GPU_BARE)
    tconfig = make_transformer_config(TINY_QWEN2, ModelConfig(), ParallelConfig(), choice)
    for name, on in choice.fusions.items():
        assert getattr(tconfig, name) is on, name


def test_rope_and_context_overrides_reach_the_gpt_model():
    base = gpt_model_kwargs(TINY_QWEN2, ModelConfig(), ParallelConfig())
    assert base["rotary_base"] == TINY_QWEN2["rope_theta"]
    assert base["max_sequence_length"] == TINY_QWEN2["max_position_embeddings"]
    over = gpt_model_kwargs(TINY_QWEN2, ModelConfig(rope_theta=40000,
                                                    max_position_embeddings=16384),
                            ParallelConfig())
    assert over["rotary_base"] == 40000.0 and over["max_sequence_length"] == 16384
    # transformers 5.x configs keep the base in rope_parameters: the override wins there too
    v5 = {**TINY_QWEN2, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert gpt_model_kwargs(v5, ModelConfig(rope_theta=5e5), ParallelConfig())[
        "rotary_base"] == 5e5


def _build_simulated_gpu_rank(theta, positions):
    """Build on CPU with the choice a bare GPU gets (the model is built, not run: the
    torch.compile'd fusions would compile for the CPU)."""
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model

    init_distributed(1, 1)
    cfg = ModelConfig(rope_theta=theta, max_position_embeddings=positions)
    model = build_model(TINY_QWEN2, cfg, ParallelConfig(), kernels=GPU_BARE)
    foreign = sorted({type(m).__module__ for m in model.modules()
                      if type(m).__module__.startswith(("transformer_engine", "apex",
                                                        "megatron.core.extensions",
                                                        "megatron.core.fusions.fused_layer_norm"))})
    kv_channels = model.config.kv_channels
    return dict(fusions={f: getattr(model.config, f) for f in
                         (*TE_APEX_FUSIONS, "bias_activation_fusion")},
                foreign=foreign,
                final_norm=type(model.decoder.final_layernorm).__name__,
                layer_norm=type(model.decoder.layers[0].input_layernorm).__name__,
                inv_freq_1=float(model.rotary_pos_emb.inv_freq[1]),
                expected_inv_freq_1=1.0 / theta ** (2 / kv_channels),
                max_sequence_length=model.max_sequence_length)


@pytest.mark.slow
def test_gpt_model_builds_for_a_gpu_without_te_or_apex():
    res = spawn_ranks(_build_simulated_gpu_rank, 1, (5e5, 2048), timeout_s=300)[0]
    assert not any(res["fusions"][f] for f in TE_APEX_FUSIONS), res["fusions"]
    assert res["fusions"]["bias_activation_fusion"]
    assert res["foreign"] == [], res["foreign"]
    assert res["final_norm"] == res["layer_norm"] == "RMSNorm"  # torch's, not apex's LayerNorm
    assert math.isclose(res["inv_freq_1"], res["expected_inv_freq_1"], rel_tol=1e-6)
    assert res["max_sequence_length"] == 2048


def _cuda_fused_vs_unfused_rank():
    """On CUDA: the detected build (auto) runs forward + backward in bf16; the local spec with
    the detected fusions gives the logits of the local spec with every fusion off."""
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model

    init_distributed(1, 1)
    kernels = detect_kernels()
    cfg = ModelConfig(dtype="bfloat16")
    vocab = TINY_QWEN2["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 32), device="cuda")
    positions = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)

    auto = build_model(TINY_QWEN2, cfg, ParallelConfig(), kernels=kernels)
    logits = auto(tokens, positions, attention_mask=None)
    logits.float().square().mean().backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in auto.parameters()
                       if p.grad is not None)

    local_cfg = ModelConfig(dtype="bfloat16", transformer_impl="local")
    fused = build_model(TINY_QWEN2, local_cfg, ParallelConfig(), kernels=kernels)
    plain = build_model(TINY_QWEN2, local_cfg, ParallelConfig(), kernels=Kernels(cuda=True))
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        diff = (fused(tokens, positions, attention_mask=None).float()
                - plain(tokens, positions, attention_mask=None).float()).abs().max().item()
    return dict(spec=choose_build("auto", kernels).spec, te=kernels.transformer_engine,
                finite=bool(torch.isfinite(logits).all()), grads_finite=grads_finite,
                shape=tuple(logits.shape), fused_vs_plain=diff)


@pytest.mark.gpu
@pytest.mark.slow
def test_model_builds_and_trains_on_cuda_with_the_detected_kernels():
    res = spawn_ranks(_cuda_fused_vs_unfused_rank, 1, (), timeout_s=600)[0]
    assert res["spec"] == ("transformer_engine" if res["te"] else "local")
    assert res["finite"] and res["grads_finite"]
    assert res["shape"][:2] == (2, 32)
    assert res["fused_vs_plain"] < 5e-2, res  # bf16 logits of the same weights
