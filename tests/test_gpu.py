"""bf16 Megatron training on CUDA: what ``benchmarks/gpu_check.sh`` runs on a GPU.

Tests marked ``gpu`` need CUDA and are skipped without it: a tiny Qwen2 in bf16 against fp32,
20 training steps through the trainer's policy API, the fused loss kernel at Qwen2.5-7B
TP2 shard shapes, checkpoint save/load, HF export -> import and ``model.load_mcore``. Figures
(the kernel's time and memory) are appended as JSON lines to ``$SRFT_GPU_FIGURES`` when set.

``SRFT_GPU_DRY_RUN=1`` on a machine without CUDA runs the same tests on CPU (gloo, a small
kernel shape) to check the tests themselves; their figures then mean nothing.

The tests named ``test_cpu_*`` check the GPU check's script and benchmark on this machine.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BENCH_SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_bench.py")

DRY_RUN = os.environ.get("SRFT_GPU_DRY_RUN") == "1" and not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = (lambda f: f) if DRY_RUN else pytest.mark.gpu
# Qwen2.5-7B at TP2: hidden 3584, half of the padded 152064 vocabulary, 1024 + 8192 tokens
KERNEL_SHAPE = dict(tokens=256, hidden=128, vocab=2048) if DRY_RUN else \
    dict(tokens=9216, hidden=3584, vocab=76032)
# modules the GPU machine does not have; the paths under test must not import them
ABSENT_ON_GPU_MACHINE = ("datasets", "math_verify", "sglang")


def record_figure(name: str, value: dict) -> None:
    path = os.environ.get("SRFT_GPU_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({name: value}) + "\n")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def layout():
    from srft_mcore.launching.distributed import init_distributed

    return init_distributed(tp=1, pp=1, seed=1234)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Qwen2 HF checkpoint (qkv bias, GQA, untied), fp32 weights."""
    from srft_mcore.models.tiny import make_tiny_hf_model

    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_qwen2")), "qwen2", seed=0,
                              hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=256)


def make_trainer(model_dir, run_dir, *overrides):
    """The trainer's bf16 policy on the tiny model: 2 prompts x (3 rollouts + 1 demo)."""
    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer

    cfg = load_config(None, [f"model.hf_path={model_dir}", "model.dtype=bfloat16",
                             "train.prompts_per_step=2", "rollout.n_samples=3",
                             "train.micro_batch_size=2", "data.max_prompt_len=64",
                             "data.max_response_len=64", "optimizer.lr=1e-3",
                             "logging.tensorboard=false", f"logging.run_dir={run_dir}",
                             *overrides])
    return Trainer(cfg).init_policy()


def synthetic_rollouts(vocab: int, n_groups: int = 2, n_samples: int = 3,
                       prompt_len: int = 12, seed: int = 0) -> list:
    """Fixed rollouts of mixed lengths: per prompt n rollouts (odd ones rewarded) + demo."""
    from srft_mcore.training.batching import TrainSequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for group in range(n_groups):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        for j in range(n_samples + 1):
            demo = j == n_samples
            reward = 1.0 if demo or j % 2 else 0.0
            response = torch.randint(3, vocab, (16 + 5 * j,), generator=g).tolist()
            seqs.append(TrainSequence(prompt + response, prompt_len, demo, reward, group,
                                      advantage=reward - 0.5))
    return seqs


def token_batch(vocab: int, batch: int = 2, seq: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return tokens.to(DEVICE), positions.to(DEVICE), targets.to(DEVICE)


def policy_logprobs(model, hf, vocab_batch):
    from srft_mcore.models.policy import policy_forward

    tokens, positions, targets = vocab_batch
    model.eval()
    with torch.no_grad():
        logp, _ = policy_forward(model, tokens, positions, targets,
                                 vocab_size=hf["vocab_size"])
    return logp.float()


def assert_placed(params, dtype) -> None:
    """Every parameter on the device; the weight matrices in ``dtype`` (the local spec's
    RMSNorm weights may stay fp32)."""
    params = list(params)
    assert {p.device.type for p in params} == {DEVICE.type}
    assert {p.dtype for p in params if p.dim() == 2} == {dtype}


def named_params(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}


def assert_same_params(expected: dict, model) -> None:
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(expected)
    different = [n for n, p in expected.items() if not torch.equal(p, got[n].detach())]
    assert not different, f"parameters differ: {different}"


def state_tensors(state, prefix: str = "") -> dict:
    """Flatten an optimizer ``state_dict`` into {path: tensor or value}."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items()
                for k, v in state_tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state)
                for k, v in state_tensors(sub, f"{prefix}/{i}").items()}
    return {prefix: state}


# --------------------------------------------------------------------------- GPU tests
@gpu
def test_bf16_forward_backward_matches_fp32(layout, tiny_dir):
    """The same weights in bf16 and fp32 on the device: log-probs and gradients agree."""
    from srft_mcore.models.bridge import load_hf_into_model
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model
    from srft_mcore.models.policy import policy_forward

    hf = load_hf_config(tiny_dir)
    tokens, positions, targets = token_batch(hf["vocab_size"])
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(hf, ModelConfig(dtype=str(dtype).split(".")[1]), ParallelConfig())
        load_hf_into_model(model, tiny_dir, hf)
        assert_placed(model.parameters(), dtype)
        logp, entropy = policy_forward(model, tokens, positions, targets,
                                       vocab_size=hf["vocab_size"])
        (-logp.mean()).backward()
        grads = [p.grad.float().flatten() for p in model.parameters()]
        runs[dtype] = (logp.detach().float(), entropy.detach().float(), grads)
    (lp32, h32, g32), (lp16, h16, g16) = runs[torch.float32], runs[torch.bfloat16]
    assert torch.isfinite(lp16).all() and all(torch.isfinite(g).all() for g in g16)
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
               for a, b in zip(g16, g32)]
    errors = {"logp_rel": ((lp16 - lp32).abs().mean() / lp32.abs().mean()).item(),
              "entropy_rel": ((h16 - h32).abs().mean() / h32.abs().mean()).item(),
              "grad_cosine_min": min(cosines)}
    record_figure("bf16_vs_fp32", errors)
    # bf16 keeps 8 mantissa bits (0.4% per rounding); a wrong kernel, cast or missing
    # gradient term is far off
    assert errors["logp_rel"] < 0.02 and errors["entropy_rel"] < 0.02, errors
    assert errors["grad_cosine_min"] > 0.98, errors


@gpu
def test_twenty_bf16_steps_lower_the_loss_with_fp32_main_grad(layout, tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, "algorithm.name=sft")
    seqs = synthetic_rollouts(trainer.hf["vocab_size"])
    losses = []
    for _ in range(20):
        metrics = trainer.train_on(seqs)
        assert metrics["train/skipped"] == 0
        assert math.isfinite(metrics["optim/grad_norm"]) and metrics["optim/grad_norm"] > 0
        losses.append(metrics["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 15, losses
    params = list(trainer.model.parameters())
    assert_placed(params, torch.bfloat16)
    assert {p.main_grad.dtype for p in params} == {torch.float32}
    assert all(p.main_grad.device.type == DEVICE.type for p in params)
    assert sum(p.main_grad.abs().sum().item() for p in params) > 0
    record_figure("train_steps_bf16", {"loss_first": losses[0], "loss_last": losses[-1]})


def _host_syncs(fn) -> list:
    """The device-to-host synchronisations while ``fn`` runs (CUDA's sync debug mode), each
    as ``file:line`` of the Python code that made it; empty on CPU."""
    import warnings

    if DEVICE.type != "cuda":
        fn()
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message).lower()]


@gpu
def test_no_host_syncs_per_chunk_or_per_micro_batch(layout, tiny_dir, tmp_path):
    """The fused kernel syncs never (any chunk count); a training step syncs a fixed number
    of times (metrics once, the finite-gradient check once, the optimizer's norm), the same
    for 8 micro-batches as for 2. Where the syncs come from is recorded in the figures."""
    from collections import Counter

    from srft_mcore.ops import linear_vocab_parallel_logprob_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 128, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(512, 128, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 500, (64,), generator=g).to(DEVICE)

    def kernel():
        lp, ent = linear_vocab_parallel_logprob_entropy(h, w, t, vocab_size=500, chunk_size=16)
        (lp.sum() + ent.sum()).backward()

    kernel()  # warm-up: first-use initialisation is not the kernel's
    in_kernel = _host_syncs(kernel)
    sites = {"kernel": dict(Counter(in_kernel))}
    counts = {}
    for mbs in (1, 4):
        trainer = make_trainer(tiny_dir, tmp_path / f"mbs{mbs}", f"train.micro_batch_size={mbs}")
        seqs = synthetic_rollouts(trainer.hf["vocab_size"])
        trainer.train_on(seqs)  # warm-up (allocations, lazy initialisation)
        step = _host_syncs(lambda: trainer.train_on(seqs))
        counts[mbs] = len(step)
        sites[f"step_micro_batch_size_{mbs}"] = dict(Counter(step))
    record_figure("host_syncs_per_step", {**{f"micro_batch_size_{k}": v
                                             for k, v in counts.items()},
                                          "kernel": len(in_kernel), "sites": sites})
    assert not in_kernel, sites["kernel"]
    assert counts[1] == counts[4], sites


def _measure(fn):
    """(result, seconds, peak bytes above what was allocated before) of ``fn()``."""
    sync()
    base = 0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if DEVICE.type == "cuda" else None
    return out, seconds, peak


@gpu
def test_fused_kernel_at_7b_tp2_shard_shapes():
    """Linear-fused and chunked log-prob + entropy vs the full-logits reference, forward and
    backward, in bf16 at one TP2 rank's Qwen2.5-7B shapes; time and peak memory recorded."""
    from srft_mcore.ops import (linear_vocab_parallel_logprob_entropy,
                                reference_logprob_entropy, vocab_parallel_logprob_entropy)

    n_tok, hidden, vocab = KERNEL_SHAPE["tokens"], KERNEL_SHAPE["hidden"], KERNEL_SHAPE["vocab"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h_th = torch.randn(n_tok, hidden, device=DEVICE, generator=g).to(torch.bfloat16)
    w_vh = (torch.randn(vocab, hidden, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n_tok,), device=DEVICE, generator=g)
    g_lp = torch.randn(n_tok, device=DEVICE, generator=g)
    g_h = torch.randn(n_tok, device=DEVICE, generator=g)

    def run(kind):
        h, w = h_th.detach().requires_grad_(), w_vh.detach().requires_grad_()
        if kind == "linear_fused":
            logp, ent = linear_vocab_parallel_logprob_entropy(h, w, targets)
        elif kind == "chunked":
            logp, ent = vocab_parallel_logprob_entropy(h @ w.t(), targets)
        else:
            logp, ent = reference_logprob_entropy(h @ w.t(), targets)
        ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad

    results, figures = {}, {"shape": KERNEL_SHAPE, "dtype": "bfloat16"}
    for kind in ("reference", "chunked", "linear_fused"):
        run(kind)  # warm-up
        results[kind], seconds, peak = _measure(lambda: run(kind))
        figures[kind] = {"ms": round(seconds * 1e3, 2),
                         "peak_extra_gib": None if peak is None else round(peak / 2**30, 3)}
    ref = results["reference"]
    for kind in ("chunked", "linear_fused"):
        logp, ent, gh, gw = results[kind]
        diffs = {"logp_max_abs": (logp - ref[0]).abs().max().item(),
                 "logp_mean_abs": (logp - ref[0]).abs().mean().item(),
                 "entropy_max_abs": (ent - ref[1]).abs().max().item(),
                 "grad_hidden_rel": ((gh.float() - ref[2].float()).norm()
                                     / ref[2].float().norm()).item(),
                 "grad_weight_rel": ((gw.float() - ref[3].float()).norm()
                                     / ref[3].float().norm()).item()}
        figures[kind].update(diffs)
    record_figure("fused_kernel", figures)
    for kind in ("chunked", "linear_fused"):
        f = figures[kind]
        assert f["logp_max_abs"] < 0.05 and f["logp_mean_abs"] < 2e-3, (kind, f)
        assert f["entropy_max_abs"] < 0.05, (kind, f)
        assert f["grad_hidden_rel"] < 0.02 and f["grad_weight_rel"] < 0.02, (kind, f)
    if DEVICE.type == "cuda":  # the fused kernel never holds [tokens, vocab] logits
        ref_peak = figures["reference"]["peak_extra_gib"]
        assert figures["linear_fused"]["peak_extra_gib"] < 0.5 * ref_peak, figures
        assert figures["chunked"]["peak_extra_gib"] < ref_peak, figures


@gpu
def test_checkpoint_round_trip_restores_params_and_optimizer(layout, tiny_dir, tmp_path):
    from srft_mcore.training import checkpoint as ckpt

    trained = make_trainer(tiny_dir, tmp_path / "a")
    seqs = synthetic_rollouts(trained.hf["vocab_size"])
    for _ in range(2):
        trained.train_on(seqs)
    path = ckpt.save_checkpoint(str(tmp_path / "ckpt"), 2, trained.model.module,
                                trained.optimizer, {"note": "gpu check"})
    fresh = make_trainer(tiny_dir, tmp_path / "b")
    expected = named_params(trained)
    assert any(not torch.equal(p, expected[n]) for n, p in fresh.model.module.named_parameters())

    state = ckpt.load_checkpoint(path, fresh.model.module, fresh.optimizer)
    assert state["step"] == 2 and state["note"] == "gpu check"
    assert_same_params(expected, fresh.model.module)
    want = state_tensors(trained.optimizer.state_dict())
    got = state_tensors(fresh.optimizer.state_dict())
    assert sorted(got) == sorted(want)
    tensors = [k for k, v in want.items() if torch.is_tensor(v)]
    assert any("exp_avg" in k for k in tensors), sorted(want)[:20]
    different = [k for k, v in want.items()
                 if not (torch.equal(v, got[k]) if torch.is_tensor(v) else v == got[k])]
    assert not different, different[:20]


@gpu
def test_hf_export_import_gives_identical_logprobs(layout, tiny_dir, tmp_path):
    """A trained bf16 policy written by the trainer's HF export and loaded back into a new
    model through the bridge: the same parameters and bit-identical log-probs."""
    from srft_mcore.models.bridge import load_hf_into_model
    from srft_mcore.models import build_model

    trainer = make_trainer(tiny_dir, tmp_path / "run")
    trainer.train_on(synthetic_rollouts(trainer.hf["vocab_size"]))  # leave the HF weights
    out = trainer.export_hf()
    reloaded = build_model(trainer.hf, trainer.cfg.model, trainer.cfg.parallel)
    load_hf_into_model(reloaded, out, trainer.hf)
    assert_same_params(named_params(trainer), reloaded)
    batch = token_batch(trainer.hf["vocab_size"])
    before = policy_logprobs(trainer.model.module, trainer.hf, batch)
    after = policy_logprobs(reloaded, trainer.hf, batch)
    assert torch.isfinite(before).all()
    assert torch.equal(before, after)


@gpu
def test_load_mcore_then_lr0_step_keeps_the_loaded_weights(layout, tiny_dir, tmp_path):
    """bf16 master weights must come from the loaded checkpoint, not the HF start weights:
    a step at lr 0 after ``model.load_mcore`` leaves the loaded weights unchanged."""
    from megatron.core import dist_checkpointing

    trained = make_trainer(tiny_dir, tmp_path / "a")
    seqs = synthetic_rollouts(trained.hf["vocab_size"])
    for _ in range(2):
        trained.train_on(seqs)
    weights = tmp_path / "mcore"  # a model-only checkpoint, as srft-convert hf-to-mcore writes
    weights.mkdir()
    dist_checkpointing.save(trained.model.module.sharded_state_dict(), str(weights))
    expected = named_params(trained)

    loaded = make_trainer(tiny_dir, tmp_path / "b", f"model.load_mcore={weights}",
                          "optimizer.lr=0.0")
    assert_same_params(expected, loaded.model.module)
    metrics = loaded.train_on(seqs)
    assert metrics["train/skipped"] == 0 and metrics["optim/grad_norm"] > 0
    assert_same_params(expected, loaded.model.module)


# --------------------------------------------------------------------------- CPU checks
def _python_without_gpu_absent_modules(code: str) -> list:
    """``python -c code`` in which the modules the GPU machine lacks do not import."""
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_GPU_MACHINE)
    return [sys.executable, "-c", "import sys\n" + hide + code]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cpu_check_script_exits_2_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "SRFT_GPU_DRY_RUN"}
    p = subprocess.run(["bash", CHECK_SCRIPT], env=dict(env, PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and "no CUDA" in lines[0], lines


def test_cpu_bench_smoke_prints_json_without_gpu_only_modules():
    """``gpu_bench.py --cpu-smoke`` runs every section and prints one JSON object, with
    datasets, math-verify and SGLang unimportable (as on the GPU machine); the modules the
    GPU tests use import without them too."""
    code = ("import srft_mcore.models.bridge, srft_mcore.training.checkpoint, srft_mcore.models.tiny, "
            "srft_mcore.models.policy, srft_mcore.training.trainer, tools.convert_ckpt.safetensors_out\n"
            "import runpy\n"
            f"sys.argv = [{BENCH_SCRIPT!r}, '--cpu-smoke']\n"
            f"runpy.run_path({BENCH_SCRIPT!r}, run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run(_python_without_gpu_absent_modules(code), env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["smoke"] is True and out["failed"] == []
    assert out["matmul_peak"]["tflops"] > 0
    step = out["train_step"]
    assert step["tokens_per_s"] > 0 and 0 < step["mfu"] and math.isfinite(step["loss"])
    assert step["memory"]["planner_peak_gib"] > 0 and step["memory"]["measured_peak_gib"] > 0
    packing = out["packing"]
    assert packing["real_tokens"] < packing["padded_tokens"]  # long-tailed: padding to drop
    assert packing["packed_tokens_per_s"] > 0 and packing["padded_tokens_per_s"] > 0
    memory = out["memory_7b"]
    assert set(memory["measured_tp1"]) == {"2", "4"}
    assert all(m["params_counted_matches"] for m in memory["measured_tp1"].values())
    assert set(memory["extrapolated"]["seq"]) == {"64", "128"}


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_memory_extrapolation_arithmetic():
    """Cuts whose activations grow exactly linearly in the layer count extrapolate to the
    same line; static memory follows 6 B/param + 12 B/param over DP."""
    bench = _load_bench()
    shape = bench.QWEN25_7B
    gib = 2**30

    def cut(layers):
        n = bench.params_per_rank(shape, layers, 1)
        static = 18 * n
        return {"params": n, "static": static,
                "seq": {"9216": {"static": static, "fwd_bwd": static + (3 + 0.5 * layers) * gib,
                                 "optimizer": static + 4 * n}}}

    out = bench.extrapolate({"2": cut(2), "4": cut(4)}, shape, layers=28, tp=2, dps=(1, 2))
    n_rank = bench.params_per_rank(shape, 28, 2)
    assert 3.7e9 < n_rank < 3.9e9  # Qwen2.5-7B: 7.6B parameters, half per TP2 rank
    assert out["params_per_rank"] == n_rank
    assert out["static_bytes_per_param_measured_tp1"] == 18
    row = out["seq"]["9216"]
    assert row["activation_per_layer_gib"] == 0.5 and row["activation_base_gib"] == 3
    assert row["activations_gib"] == 3 + 0.5 * 28
    dp1, dp2 = row["dp"]["1"], row["dp"]["2"]
    assert dp1["params_grads_gib"] == dp2["params_grads_gib"] == round(6 * n_rank / gib, 2)
    assert dp2["optimizer_state_gib"] == round(6 * n_rank / gib, 2)
    want = (6 * n_rank + 12 * n_rank / 2 + max(17 * gib, 4 * n_rank / 2)) / gib
    assert dp2["peak_gib"] == round(want, 2)
    assert dp2["fits"] == (want * gib < bench.CARD_BYTES)
    assert dp1["peak_gib"] > dp2["peak_gib"]


def test_cpu_model_flops_count():
    """Forward FLOPs of a Qwen2.5-7B sequence: 2 per weight (but the input embedding's) per
    token, plus attention."""
    bench = _load_bench()
    per_token = bench.forward_flops(bench.QWEN25_7B, 1)
    # 2 x (6.5e9 parameters in the layers + 0.55e9 in the output layer)
    assert 1.35e10 < per_token < 1.45e10
    long = bench.forward_flops(bench.QWEN25_7B, 8192) / 8192
    assert long > per_token  # attention grows with the context


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cpu_dry_run_of_the_whole_check(tmp_path):
    """The check script end to end on CPU (SRFT_GPU_DRY_RUN=1): one JSON object with the
    pytest counts and the smoke benchmark, written to $OUT."""
    env = dict(os.environ, PYTHON=sys.executable, SRFT_GPU_DRY_RUN="1", OUT=str(tmp_path),
               OMP_NUM_THREADS="1",
               # the check's pytest in one process, not pytest.ini's two workers: a few
               # tests, run beside this session's own workers on the same cores
               PYTEST_ADDOPTS="-n 0")
    p = subprocess.run(["bash", CHECK_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    out = json.loads(p.stdout)
    assert out == json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["dry_run"] is True
    assert out["pytest"]["passed"] + out["pytest"]["failed"] + out["pytest"]["errors"] >= 6
    assert out["benchmark"]["failed"] == []
    assert (p.returncode == 0) == (out["pytest"]["failed"] + out["pytest"]["errors"] == 0)


def test_cpu_figures_keep_significant_digits():
    """Figures are rounded to significant digits, so a busy machine's small TFLOP/s or MFU
    is never reported (and asserted) as 0."""
    bench = _load_bench()
    assert bench.sig(0.000123456) == 0.0001235 and bench.sig(629.41) == 629.4
    assert bench.sig(3e-9) > 0
