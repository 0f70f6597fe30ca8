"""srft-plan: parameter counts (hand-computed and against transformers models), the memory
terms' arithmetic, the layout search and its explanations, the CLI, and the estimate
against the measured peak memory of real trainer steps on CPU."""
import json
import os
import sys

import pytest

from srft_mcore.planning.cli import main
from srft_mcore.planning.layout_search import evaluate, pp_layer_split
from srft_mcore.planning.memory_estimate import (
    layer_activation_bytes, optimizer_bytes, stage_activation_bytes, trainer_memory)
from srft_mcore.planning.model_shape import (
    PRESETS, PlanError, hf_param_count, layer_params, layer_params_per_rank, load_model,
    padded_vocab, shape_from_hf, stage_layers, stage_params)
from srft_mcore.planning.report import build_report, format_table
from srft_mcore.planning.rollout_estimate import (
    kv_budget_bytes, kv_bytes_per_token, sglang_weight_bytes)
from srft_mcore.planning.run_shape import Assumptions, GB, GIB, Hardware, Layout, RunShape
from srft_mcore.planning.throughput_estimate import pipeline_bubble

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published totals of the checkpoints (safetensors metadata / model cards): the unique
# parameters, a tied lm_head counted once.
KNOWN_PARAMS = {
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352, "qwen2.5-72b": 72_706_203_648,
    "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360, "qwen3-14b": 14_768_307_200, "qwen3-32b": 32_762_123_264,
    "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
}
MEMORY_ERROR_BOUND = 0.05
"""The documented bound of |estimate / measured - 1| on CPU (README, section Scaling)."""


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_preset_parameter_counts_are_exact(name):
    assert hf_param_count(load_model(name)) == KNOWN_PARAMS[name]


def test_parameter_count_by_hand():
    # Qwen2.5-7B: h 3584, 28 layers, 28 heads, 4 KV heads (d 128), f 18944, V 152064, untied
    h, q, kv, f, v = 3584, 28 * 128, 4 * 128, 18944, 152064
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv)  # + q/k/v biases
    layer = attention + 3 * h * f + 2 * h
    assert hf_param_count(load_model("qwen2.5-7b")) == 28 * layer + 2 * v * h + h
    # Qwen3-8B: head_dim 128 given separately, q/k norms, no biases
    h, q, kv, f, v = 4096, 32 * 128, 8 * 128, 12288, 151936
    layer = h * q + 2 * h * kv + q * h + 2 * 128 + 3 * h * f + 2 * h
    assert hf_param_count(load_model("qwen3-8b")) == 36 * layer + 2 * v * h + h


def _tiny_hf_models():
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return [
        (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=False)),
        (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True)),
        (LlamaForCausalLM, LlamaConfig(**common, tie_word_embeddings=False)),
        (LlamaForCausalLM, LlamaConfig(**common, attention_bias=True, mlp_bias=True)),
        (Qwen3ForCausalLM, Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)),
        (Qwen3ForCausalLM, Qwen3Config(**common, head_dim=32, tie_word_embeddings=True,
                                       attention_bias=True)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_parameter_count_matches_transformers(index):
    import torch

    cls, cfg = _tiny_hf_models()[index]
    torch.manual_seed(0)
    model = cls(cfg)
    shape = shape_from_hf(cfg.to_dict())
    assert hf_param_count(shape) == sum(p.numel() for p in model.parameters())


def test_megatron_stage_params_add_up():
    m = load_model("qwen2.5-7b")
    v_pad = padded_vocab(m.vocab, 2)
    assert v_pad % 256 == 0 and v_pad >= m.vocab
    # PP2: both stages together hold every layer once, the embeddings, output and final norm
    total = sum(stage_params(m, 1, 2, s) for s in ("first", "last"))
    assert total == m.layers * layer_params(m) + 2 * padded_vocab(m.vocab, 1) * m.hidden \
        + m.hidden
    # TP splits everything but the replicated norms
    one, two = layer_params_per_rank(m, 1), layer_params_per_rank(m, 2)
    assert two == (one - 2 * m.hidden) // 2 + 2 * m.hidden


def test_uneven_pipeline_split():
    m = load_model("qwen2.5-72b")  # 80 layers
    assert pp_layer_split(m, 8) is None
    split = pp_layer_split(m, 3)
    assert split == [27, 27, 26] and stage_layers(m, 3) == 27


# --------------------------------------------------------------------------- memory terms
def test_kv_cache_bytes():
    m = load_model("qwen2.5-7b")
    assert kv_bytes_per_token(m) == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token(m, 2) == kv_bytes_per_token(m) // 2
    assert kv_bytes_per_token(m, 8) == kv_bytes_per_token(m, 4)  # KV heads replicate


def test_sglang_memory_fraction_is_the_trainers_by_placement(monkeypatch, tmp_path):
    """srft-plan sizes the KV pool with the fraction the trainer launches servers with:
    0.85 on dedicated GPUs, 0.6 colocated, an explicit value for both."""
    from srft_mcore.config import RolloutConfig
    from srft_mcore.rollout import engine

    m, hw = load_model("qwen2.5-7b"), Hardware(gpus=8, gpu_mem_gb=80)
    a = Assumptions()
    weights_and_context = sglang_weight_bytes(m, 1) + a.sglang_residual_gib * GIB
    for colocated, fraction in ((False, 0.85), (True, 0.6)):
        budget = kv_budget_bytes(m, 1, hw, a, colocated=colocated)
        assert budget == int(fraction * 80 * GB - weights_and_context)
    fixed = Assumptions(sglang_mem_fraction=0.7)
    assert kv_budget_bytes(m, 1, hw, fixed, colocated=True) == \
        kv_budget_bytes(m, 1, hw, fixed) == int(0.7 * 80 * GB - weights_and_context)

    launched = []

    class Recorder(engine.SGLangServer):
        def start(self):
            launched.append(self.command())
            return self

        def wait_healthy(self, timeout_s=None):
            return self

    monkeypatch.setattr(engine, "SGLangServer", Recorder)
    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    monkeypatch.setattr("srft_mcore.rollout.server.cuda_available", lambda: True)
    for mode, fraction in (("distributed", "0.85"), ("tensor", "0.6")):
        engine.launch_servers(RolloutConfig(weight_sync=mode), "model", str(tmp_path))
        engine.launch_servers(RolloutConfig(weight_sync=mode, mem_fraction=0.5), "model",
                              str(tmp_path))
    flags = [cmd[cmd.index("--mem-fraction-static") + 1] for cmd in launched]
    assert flags == ["0.85", "0.5", "0.6", "0.5"], launched


def test_optimizer_states_shard_over_dp():
    bf16, fp32 = Assumptions(dtype="bfloat16"), Assumptions(dtype="float32")
    assert optimizer_bytes(1000, 1, True, bf16) == 12_000  # master + 2 moments
    assert optimizer_bytes(1000, 4, True, bf16) == 3_000
    assert optimizer_bytes(1000, 4, False, bf16) == 12_000
    assert optimizer_bytes(1000, 4, True, fp32) == 2_000  # no master copy


def test_activation_options_lower_memory():
    m = load_model("qwen2.5-7b")
    run, a = RunShape(), Assumptions()
    base = Layout(tp=2, pp=1, dp=4)
    peak = {name: trainer_memory(m, run, lay, a).terms["activations"] for name, lay in {
        "plain": base, "sp": Layout(2, 1, 4, sequence_parallel=True),
        "recompute": Layout(2, 1, 4, recompute=True)}.items()}
    assert peak["recompute"] < peak["sp"] < peak["plain"]
    # the local spec materialises the s^2 attention scores, flash attention (te) does not
    local = layer_activation_bytes(m, 2, False, 9216, Assumptions(spec="local"))
    te = layer_activation_bytes(m, 2, False, 9216, a)
    assert local > 4 * te


def test_pipeline_keeps_p_micro_batches_on_the_first_stage():
    m, run, a = load_model("qwen2.5-7b"), RunShape(), Assumptions()
    lay = Layout(tp=2, pp=4, dp=1, sequence_parallel=True)
    first = stage_activation_bytes(m, run, lay, "first", a)
    last = stage_activation_bytes(m, run, lay, "last", a)
    assert first["logprob_scratch"] == 0 < last["logprob_scratch"]
    assert first["activations"] > 3 * last["activations"]
    assert pipeline_bubble(4, 12) == pytest.approx(3 / 15)


# --------------------------------------------------------------------------- search
def _report(model, gpus, **kw):
    hw = Hardware(gpus=gpus, gpu_mem_gb=80)
    return build_report(load_model(model), RunShape(), hw, Assumptions(), top=50, **kw)


def test_qwen7b_on_8_gpus_lists_tp2_pp1_dp4_and_explains_tp1():
    report = _report("qwen2.5-7b", 8)
    layouts = {(p["tp"], p["pp"], p["dp"]) for p in report["layouts"]}
    assert (2, 1, 4) in layouts
    assert all(p["fits"] and p["memory_gb"]["peak"] <= 80 for p in report["layouts"])
    tp1 = report["tp_summary"]["TP1"]["pp1"]
    assert not tp1["fits"]  # pure data parallelism does not fit; each placement says why
    assert "sglang" in tp1["why_not"]["colocated"]["why"][0]
    assert "trainer" in tp1["why_not"]["dedicated"]["why"][0]
    text = format_table(report)
    assert "TP1 PP1 colocated: does not fit" in text and "| 2 | 1 | 4 |" in text


def test_plans_are_ranked_by_throughput_and_explained():
    report = _report("qwen2.5-32b", 32)
    speeds = [p["tokens_per_s"] for p in report["layouts"]]
    assert speeds and speeds == sorted(speeds, reverse=True)
    for p in report["layouts"]:
        t = p["time_s"]
        assert t["step_s"] == pytest.approx(t["rollout_s"] + t["reward_s"] + t["train_s"]
                                            + t["sync_s"], abs=0.2)
    assert all(p["why_not"] for p in report["not_fitting"])


def test_fixed_rollout_split_and_colocated_only():
    dedicated = _report("qwen2.5-7b", 8, rollout_gpus=4)
    assert {p["rollout"]["mode"] for p in dedicated["layouts"]} == {"dedicated"}
    assert all(p["trainer_gpus"] == 4 and p["rollout"]["gpus"] == 4
               for p in dedicated["layouts"])
    colocated = _report("qwen2.5-7b", 8, colocated=True)
    assert {p["rollout"]["mode"] for p in colocated["layouts"]} == {"colocated"}


def test_overlapped_rollouts_hide_behind_training():
    m, hw, a = load_model("qwen2.5-7b"), Hardware(gpus=8, gpu_mem_gb=80), Assumptions()
    plain = evaluate(m, RunShape(), hw, a, 2, 1, 2, 4, colocated=False)
    over = evaluate(m, RunShape(overlap=True), hw, a, 2, 1, 2, 4, colocated=False)
    t = plain.times
    assert over.times["step_s"] == pytest.approx(
        max(t["rollout_s"] + t["reward_s"], t["train_s"]) + t["sync_s"])
    assert over.tokens_per_s > plain.tokens_per_s
    colocated = evaluate(m, RunShape(overlap=True), hw, a, 2, 1, 4, 0, colocated=True)
    c = colocated.times  # the trainer refuses overlap with colocated servers: sequential
    assert c["step_s"] == pytest.approx(c["rollout_s"] + c["reward_s"] + c["train_s"]
                                        + c["sync_s"])


def test_cli_json_for_qwen72b_on_64_gpus(capsys):
    assert main(["--model", "qwen2.5-72b", "--gpus", "64", "--gpu-mem", "80", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layouts"] and report["model"]["params"] == KNOWN_PARAMS["qwen2.5-72b"]
    assert all(p["memory_gb"]["peak"] <= 80 for p in report["layouts"])


def test_cli_reads_a_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PRESETS["qwen3-4b"]))
    assert main(["--model", str(path), "--gpus", "8", "--gpu-mem", "80"]) == 0
    assert "4.02B params" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-5", "--gpus", "8", "--gpu-mem", "80"], "neither a preset"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--gpu-mem", "80", "--rollout-gpus", "8"],
     "--rollout-gpus=8"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--gpu-mem", "80", "--mini-batches", "3"],
     "does not divide"),
])
def test_cli_errors_say_how_to_fix(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix:" in err


def test_unsupported_model_type():
    with pytest.raises(PlanError, match="Fix:"):
        shape_from_hf({"model_type": "mixtral", "hidden_size": 8})


# --------------------------------------------------------------------------- measured
@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2_h256", "qwen2_tp2"])
def test_estimate_matches_measured_cpu_peak(case):
    """A real trainer step (fp32, local spec) under the profiler's allocation tracking."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import planner_memory
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        result = planner_memory.compare(case, work)
    assert result["params_per_rank"]["model"] == result["params_per_rank"]["planner"]
    assert abs(result["error"]) <= MEMORY_ERROR_BOUND, result


def test_cli_json_runs_without_torch():
    """srft-plan is arithmetic only: a subprocess run of its CLI module imports no torch."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "srft_mcore.planning.cli", "--model",
         "qwen2.5-7b", "--gpus", "8", "--gpu-mem", "80", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "srft_mcore.planning.report" in imported  # the trace did record our imports
    assert not [name for name in imported if name.split(".")[0] == "torch"]
    report = json.loads(proc.stdout)
    assert report["model"]["name"] == "qwen2.5-7b" and report["layouts"]
