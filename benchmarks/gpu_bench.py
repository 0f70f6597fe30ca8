"""Train-step throughput, memory and packing of the trainer on one GPU; prints one JSON object.

1. ``matmul_peak``: TFLOP/s of an 8192^3 bf16 matmul in this process after the clocks have
   settled (the MFU denominator), and the card's datasheet bf16 dense peak when known.
2. ``train_step``: a ~1B random Qwen2-shaped model at TP1 in bf16 through the trainer's policy
   API (``Trainer.init_policy`` + ``Policy.train_on``: Megatron schedule, linear-fused loss,
   old-policy pass, one optimizer step): tokens/s, MFU against both peaks, and the measured
   peak of allocated memory against srft-plan's estimate of the same run (a ratio).
3. ``packing``: the same model on long-tailed response lengths, packed micro-batches
   (``train.max_tokens_per_micro_batch``) against padded ones: real tokens/s and the ratio.
4. ``memory_7b``: the Qwen2.5-7B config cut to 2 and 4 layers, full recompute, peak memory of
   a train step at 2048 and 9216 tokens per sequence, extrapolated to 28 layers at TP2 (the
   7B recipe's layout) against an 80 GB card; ``method`` in the JSON says how.

The JSON is written to ``--out`` after every section, so a section that runs out of time
loses none of the figures before it.

    python benchmarks/gpu_bench.py [--out FILE] [--sections matmul_peak train_step packing memory_7b]
    python benchmarks/gpu_bench.py --cpu-smoke     # the same code on CPU at toy sizes

``--cpu-smoke`` runs every code path on CPU (gloo) with toy shapes in well under a minute;
its figures mean nothing (CPU memory is the sampled process RSS). Exit status 1 when a
section failed (its entry then holds the error).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 2**30
CARD_BYTES = 80e9
"""The 80 GB card of the extrapolation (an H100 80GB reports 81559 MiB; the difference is
left to the CUDA context, NCCL buffers and allocator fragmentation)."""

# HF-style shapes (srft_mcore.models.tiny.tiny_hf_config keywords)
QWEN25_7B = dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                 intermediate_size=18944, vocab_size=152064, tied=False, rope_theta=1e6,
                 max_position_embeddings=32768)
BENCH_1B = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=2,
                intermediate_size=5632, vocab_size=151936, tied=True, rope_theta=1e6,
                max_position_embeddings=4096)

FULL = dict(
    matmul_n=8192,
    train=dict(shape=BENCH_1B, prompts=4, n_samples=3, prompt_len=512, response_len=1536,
               micro_batch=2, timed_steps=3),
    memory=dict(shape=QWEN25_7B, cut_layers=(2, 4), prompt_len=1024,
                seq_lens=(2048, 9216), recompute=True),
    packing=dict(shape=BENCH_1B, cap=4096, prompts=4, n_samples=7, micro_batch=2, repeat=2),
)
SMOKE = dict(
    matmul_n=256,
    train=dict(shape=dict(BENCH_1B, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=128, vocab_size=512),
               prompts=2, n_samples=1, prompt_len=16, response_len=48, micro_batch=2,
               timed_steps=1),
    memory=dict(shape=dict(QWEN25_7B, hidden_size=64, num_heads=4, num_kv_heads=2,
                           intermediate_size=192, vocab_size=1024),
                cut_layers=(2, 4), prompt_len=16, seq_lens=(64, 128),
                # Megatron's recompute runs the layers inside an autograd Function, where the
                # CPU patches do not reach its literal device="cuda" causal mask
                recompute=False),
    packing=dict(shape=dict(BENCH_1B, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=128, vocab_size=512),
                 cap=96, prompts=2, n_samples=3, micro_batch=2, repeat=1),
)


# --------------------------------------------------------------------------- measuring
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe:
    """Allocated and peak bytes: the CUDA allocator's counters, or on CPU the process RSS
    sampled every millisecond (smoke runs only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._top = 0
        self._stop = threading.Event()
        if not self.cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.is_set():
            self._top = max(self._top, _rss())
            time.sleep(0.001)

    def allocated(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _rss()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._top = _rss()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return max(self._top, _rss())

    def close(self) -> None:
        self._stop.set()


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a slow machine's small figure stays non-zero
    (rounding to fixed decimals turned a busy CPU's TFLOP/s into 0.0)."""
    return float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SPEC_BF16_DENSE_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                          "H100 PCIe": 756.0, "A100": 312.0, "H20": 148.0, "B200": 2250.0}
"""Vendor datasheet bf16 dense (no sparsity) TFLOP/s, matched as a substring of the device
name (SXM figures for H100/H200)."""


def spec_peak(name: str) -> dict | None:
    for key, tflops in SPEC_BF16_DENSE_TFLOPS.items():
        if key.lower() in name.lower():
            return {"name": f"{key} datasheet bf16 dense", "tflops": tflops}
    return None


def matmul_tflops(device: torch.device, n: int, settle_s: float = 1.0,
                  min_iters: int = 50) -> dict:
    """Measured bf16 dense matmul throughput: products run for ``settle_s`` seconds first
    (clocks ramp up from idle), then the mean of at least ``min_iters`` timed products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_end = time.perf_counter() + settle_s
    while time.perf_counter() < t_end:
        for _ in range(5):
            a @ b
        sync(device)
    iters = min_iters
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    dt = time.perf_counter() - t0
    return {"shape": [n, n, n], "dtype": "bfloat16", "iters": iters, "settle_s": settle_s,
            "tflops": sig(2 * n**3 * iters / dt / 1e12),
            "spec": spec_peak(torch.cuda.get_device_name(device))
            if device.type == "cuda" else None}


# --------------------------------------------------------------------------- model arithmetic
def _dims(shape: dict) -> tuple:
    h = shape["hidden_size"]
    head_dim = h // shape["num_heads"]
    return h, shape["num_heads"] * head_dim, shape["num_kv_heads"] * head_dim, \
        shape["intermediate_size"]


def params_per_rank(shape: dict, layers: int, tp: int) -> int:
    """Parameters one TP rank holds (local spec: fused QKV with bias, gate+up, RMSNorms)."""
    from srft_mcore.models.builder import padded_vocab_size

    h, q, kv, ffn = _dims(shape)
    split = (q + 2 * kv) * (h + 1) + q * h + 3 * ffn * h  # QKV (+bias), proj, fc1, fc2
    layer = split // tp + 2 * h  # the two norms are replicated
    embedding = padded_vocab_size(shape["vocab_size"], 128, tp) * h // tp
    output = 0 if shape["tied"] else embedding
    return layers * layer + embedding + output + h


def forward_flops(shape: dict, seq_len: int) -> float:
    """Model FLOPs of one sequence's forward: matmuls, causal attention, the logits."""
    h, q, kv, ffn = _dims(shape)
    layers = shape["num_layers"]
    dense = 2 * seq_len * layers * ((q + 2 * kv) * h + q * h + 3 * ffn * h)
    attention = 2 * 2 * layers * q * seq_len * (seq_len + 1) / 2  # QK^T and AV, causal half
    logits = 2 * seq_len * h * shape["vocab_size"]
    return dense + attention + logits


# --------------------------------------------------------------------------- trainer set-up
def make_model_dir(root: str, shape: dict) -> str:
    """A HF model directory (config.json + the embedded tokenizer) without weights."""
    from srft_mcore.models.tiny import TOKENIZER_DIR, tiny_hf_config

    path = tempfile.mkdtemp(prefix="model_", dir=root)
    tiny_hf_config("qwen2", **shape).save_pretrained(path)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(path, name))
    return path


def make_trainer(model_dir: str, run_dir: str, *, prompts: int, n_samples: int,
                 micro_batch: int, max_prompt: int, max_response: int, recompute: bool,
                 extra: tuple = ()):
    """The trainer's policy (random bf16 weights, SRFT loss), no data and no SGLang."""
    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer

    overrides = [f"model.hf_path={model_dir}", "model.load_hf_weights=false",
                 "model.dtype=bfloat16", f"train.prompts_per_step={prompts}",
                 f"rollout.n_samples={n_samples}", f"train.micro_batch_size={micro_batch}",
                 f"data.max_prompt_len={max_prompt}", f"data.max_response_len={max_response}",
                 "optimizer.lr=1e-6", f"logging.run_dir={run_dir}", "algorithm.name=srft"]
    if recompute:
        overrides.append("model.recompute_granularity=full")
    return Trainer(load_config(None, [*overrides, *extra])).init_policy()


def synthetic_batch(prompts: int, n_samples: int, prompt_len: int, response_len: int,
                    vocab: int, seed: int = 0) -> list:
    """Equal-length sequences shaped like one step: per prompt ``n_samples`` rollouts (every
    second one rewarded) and the demonstration."""
    from srft_mcore.training.batching import TrainSequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for group in range(prompts):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for j in range(n_samples + 1):
            demo = j == n_samples
            reward = 1.0 if demo or j % 2 else 0.0
            response = torch.randint(0, vocab, (response_len,), generator=g).tolist()
            seqs.append(TrainSequence(prompt + response, prompt_len, demo, reward, group,
                                      advantage=reward - 0.5))
    return seqs


def count_params(trainer) -> int:
    return sum(p.numel() for p in trainer.model.parameters())


@contextlib.contextmanager
def split_at_optimizer_step(trainer, probe: MemoryProbe, peaks: dict):
    """Record the peak before the optimizer step (old-policy pass, forward, backward) in
    ``peaks['fwd_bwd']`` and the optimizer step's own peak in ``peaks['optimizer']``."""
    step = trainer.optimizer.step

    def measured_step(*args, **kwargs):
        peaks["fwd_bwd"] = max(peaks.get("fwd_bwd", 0), probe.peak())
        probe.reset_peak()
        try:
            return step(*args, **kwargs)
        finally:
            peaks["optimizer"] = max(peaks.get("optimizer", 0), probe.peak())

    trainer.optimizer.step = measured_step
    try:
        yield peaks
    finally:
        del trainer.optimizer.step  # the class's method again


# --------------------------------------------------------------------------- sections
def bench_train_step(device: torch.device, work: str, spec: dict, peak_tflops: float,
                     spec_tflops: dict | None = None) -> dict:
    """``mfu`` against the measured matmul peak, ``mfu_vs_spec`` against the datasheet."""
    shape = spec["shape"]
    trainer = make_trainer(make_model_dir(work, shape), os.path.join(work, "run_1b"),
                           prompts=spec["prompts"], n_samples=spec["n_samples"],
                           micro_batch=spec["micro_batch"], max_prompt=spec["prompt_len"],
                           max_response=spec["response_len"], recompute=False)
    seqs = synthetic_batch(spec["prompts"], spec["n_samples"], spec["prompt_len"],
                           spec["response_len"], shape["vocab_size"])
    trainer.train_on(seqs)  # warm-up: optimizer state, kernels
    probe = MemoryProbe(device)
    probe.reset_peak()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(spec["timed_steps"]):
        metrics = trainer.train_on(seqs)
    sync(device)
    step_s = (time.perf_counter() - t0) / spec["timed_steps"]
    peak = probe.peak()
    probe.close()
    seq_len = spec["prompt_len"] + spec["response_len"]
    tokens = len(seqs) * seq_len
    # old-policy pass (1 forward) + training forward and backward (3 forwards)
    flops = 4 * len(seqs) * forward_flops(shape, seq_len)
    achieved = flops / step_s / 1e12
    out = {"model": dict(shape, params=count_params(trainer)), "tp": 1, "dtype": "bfloat16",
           "sequences": len(seqs), "seq_len": seq_len,
           "micro_batch_size": spec["micro_batch"], "timed_steps": spec["timed_steps"],
           "s_per_step": sig(step_s), "tokens_per_s": sig(tokens / step_s),
           "model_tflops_per_step": sig(flops / 1e12),
           "achieved_tflops": sig(achieved),
           "mfu": sig(achieved / peak_tflops) if peak_tflops else None,
           "mfu_vs_spec": sig(achieved / spec_tflops["tflops"]) if spec_tflops else None,
           "spec_peak": spec_tflops,
           "loss": metrics.get("loss"), "grad_norm": metrics.get("optim/grad_norm"),
           "memory": planner_vs_measured(shape, spec, peak),
           "flops_counted": "4 forwards per sequence (old-policy pass, training forward, "
                            "backward = 2): dense matmuls, causal attention, logits (the "
                            "loss formed in the kernel recomputes none)"}
    return out


def planner_vs_measured(shape: dict, spec: dict, measured: int) -> dict:
    """srft-plan's peak for the train-step run (bf16, local spec, torch Adam, TP1 DP1, no
    fixed overhead: the allocator's counters hold only tensors) against the measured peak of
    allocated bytes over the timed steps."""
    from srft_mcore.planning.memory_estimate import trainer_memory
    from srft_mcore.planning.model_shape import shape_from_hf
    from srft_mcore.planning.run_shape import Assumptions, Layout, RunShape
    from srft_mcore.models.tiny import tiny_hf_config

    hf = tiny_hf_config("qwen2", **shape).to_dict()
    run = RunShape(prompts_per_step=spec["prompts"], n_samples=spec["n_samples"],
                   prompt_len=spec["prompt_len"], response_len=spec["response_len"],
                   micro_batch=spec["micro_batch"], mini_batches=1)
    a = Assumptions(dtype="bfloat16", spec="local", fused_adam=False, overhead_gib=0.0)
    est = trainer_memory(shape_from_hf(hf, "bench"), run,
                         Layout(tp=1, pp=1, dp=1, distributed_optimizer=False), a)
    return {"measured_peak_gib": sig(measured / GIB), "planner_peak_gib": sig(est.peak / GIB),
            "ratio_planner_vs_measured": sig(est.peak / measured),
            "planner_terms_gib": {k: sig(v / GIB) for k, v in est.terms.items()},
            "measured": "torch.cuda.max_memory_allocated over the timed steps (CPU smoke: "
                        "process RSS, not comparable)"}


def bench_packing(device: torch.device, work: str, spec: dict) -> dict:
    """Real tokens/s of train steps with long-tailed response lengths (most short, a few
    near the cap): padded micro-batches (``micro_batch`` rows padded to the longest) vs
    packed ones (``train.max_tokens_per_micro_batch`` = the same ``micro_batch`` x longest
    sequence, so both hold at most as many tokens per micro-batch)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import PROMPT, long_tail_lengths, make_step

    shape, cap, prompts, n = spec["shape"], spec["cap"], spec["prompts"], spec["n_samples"]
    model_dir = make_model_dir(work, shape)
    seqs = make_step(long_tail_lengths(prompts * (n + 1), cap, seed=0), prompts, n + 1,
                     shape["vocab_size"], seed=0)
    real = sum(len(s.tokens) for s in seqs)
    budget = spec["micro_batch"] * (PROMPT + cap)
    out = {"model": shape, "sequences": len(seqs), "cap": cap, "real_tokens": real,
           "padded_tokens": len(seqs) * max(len(s.tokens) for s in seqs),
           "micro_batch_size": spec["micro_batch"], "max_tokens_per_micro_batch": budget}
    for name, extra in (("padded", ()), ("packed", (f"train.max_tokens_per_micro_batch={budget}",))):
        free_memory()
        trainer = make_trainer(model_dir, os.path.join(work, f"pack_{name}"), prompts=prompts,
                               n_samples=n, micro_batch=spec["micro_batch"], max_prompt=PROMPT,
                               max_response=cap, recompute=False, extra=extra)
        trainer.train_on(seqs)  # warm-up
        best = math.inf
        for _ in range(spec["repeat"]):
            sync(device)
            t0 = time.perf_counter()
            trainer.train_on(seqs)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_s_per_step"] = sig(best)
        out[f"{name}_tokens_per_s"] = sig(real / best)
        del trainer
    out["ratio_packed_vs_padded"] = sig(out["packed_tokens_per_s"] / out["padded_tokens_per_s"])
    return out


def fresh_attention_buffer() -> None:
    """Drop Megatron's global buffer (the local spec's attention scores live there and it
    only grows), so that every cut starts from the same state."""
    from megatron.core import parallel_state as ps

    ps.destroy_global_memory_buffer()
    ps._set_global_memory_buffer()
    free_memory()


def measure_cut(device: torch.device, work: str, spec: dict, layers: int) -> dict:
    """Static memory and the per-phase peaks of train steps of the 7B config cut to
    ``layers`` layers, one per sequence length (after a warm-up step that allocates the
    optimizer state)."""
    shape = dict(spec["shape"], num_layers=layers)
    max_len = max(spec["seq_lens"])
    fresh_attention_buffer()
    trainer = make_trainer(make_model_dir(work, shape), os.path.join(work, f"run_{layers}"),
                           prompts=1, n_samples=1, micro_batch=1,
                           max_prompt=spec["prompt_len"],
                           max_response=max_len - spec["prompt_len"],
                           recompute=spec["recompute"])
    probe = MemoryProbe(device)
    try:
        return _measure_steps(trainer, probe, spec, shape, layers)
    finally:
        probe.close()


def _measure_steps(trainer, probe: MemoryProbe, spec: dict, shape: dict, layers: int) -> dict:
    def batch(seq_len):
        return synthetic_batch(1, 1, spec["prompt_len"], seq_len - spec["prompt_len"],
                               shape["vocab_size"])

    trainer.train_on(batch(min(spec["seq_lens"])))
    n_params = count_params(trainer)
    out = {"layers": layers, "params": n_params,
           "params_counted_matches": n_params == params_per_rank(shape, layers, 1),
           "static": probe.allocated(), "seq": {}}
    for seq_len in spec["seq_lens"]:
        free_memory()
        peaks = {"static": probe.allocated()}
        probe.reset_peak()
        with split_at_optimizer_step(trainer, probe, peaks):
            metrics = trainer.train_on(batch(seq_len))
        peaks.setdefault("fwd_bwd", probe.peak())  # a skipped step has no optimizer step
        peaks.setdefault("optimizer", peaks["static"])
        peaks.update(loss=metrics.get("loss"), skipped=metrics.get("train/skipped"))
        out["seq"][str(seq_len)] = peaks
    return out


def extrapolate(measured: dict, shape: dict, layers: int = 28, tp: int = 2,
                dps=(1, 2, 4), card_bytes: float = CARD_BYTES) -> dict:
    """Per-rank peak memory of the full model at TP ``tp`` from two measured cuts.

    measured: ``{"2": cut, "4": cut}`` as :func:`measure_cut` returns them (at TP1).
    """
    (la, a), (lb, b) = sorted(((int(k), v) for k, v in measured.items()))[:2]
    n_rank = params_per_rank(shape, layers, tp)
    result = {"layers": layers, "tp": tp, "params_per_rank": n_rank,
              "card_gib": round(card_bytes / GIB, 2),
              "static_bytes_per_param_measured_tp1": round(
                  (a["static"] / a["params"] + b["static"] / b["params"]) / 2, 2),
              "seq": {}}
    for seq in a["seq"]:
        pa, pb = a["seq"][seq], b["seq"][seq]
        act_a, act_b = pa["fwd_bwd"] - pa["static"], pb["fwd_bwd"] - pb["static"]
        per_layer = (act_b - act_a) / (lb - la)
        base = act_a - la * per_layer
        activations = base + layers * per_layer
        opt_per_param = max((pa["optimizer"] - pa["static"]) / a["params"],
                            (pb["optimizer"] - pb["static"]) / b["params"])
        row = {"activation_per_layer_gib": round(per_layer / GIB, 3),
               "activation_base_gib": round(base / GIB, 3),
               "activations_gib": round(activations / GIB, 2),
               "optimizer_step_transient_bytes_per_param": round(opt_per_param, 2),
               "dp": {}}
        for dp in dps:
            params_grads = 6 * n_rank  # bf16 params + fp32 grad buffer on every rank
            optim_state = 12 * n_rank / dp  # fp32 master + Adam moments, sharded over DP
            transient = opt_per_param * n_rank / dp
            peak = params_grads + optim_state + max(activations, transient)
            row["dp"][str(dp)] = {"params_grads_gib": round(params_grads / GIB, 2),
                                  "optimizer_state_gib": round(optim_state / GIB, 2),
                                  "optimizer_step_transient_gib": round(transient / GIB, 2),
                                  "peak_gib": round(peak / GIB, 2),
                                  "headroom_gib": round((card_bytes - peak) / GIB, 2),
                                  "fits": bool(peak < card_bytes)}
        result["seq"][seq] = row
    return result


EXTRAPOLATION_METHOD = [
    "Measured on one GPU at TP1, bf16, micro-batch 1, full recompute (see recompute), "
    "local layer spec (no flash attention): the 7B config cut to 2 and to 4 layers, one "
    "train step per length after a warm-up step.",
    "static: bytes allocated between steps (bf16 params, fp32 grad buffer, fp32 master "
    "params, Adam moments); fwd_bwd: peak up to the optimizer step (old-policy pass, "
    "forward, backward); optimizer: peak of the optimizer step.",
    "activations(L) = fwd_bwd - static; per layer = (activations(4) - activations(2)) / 2 "
    "(the checkpointed layer input); base = activations(2) - 2 * per layer (embedding, the "
    "recomputed layer's working set with the attention scores that the local spec "
    "materializes, the fused loss); full model = base + 28 * per layer.",
    "At TP2 the activations are not divided (an upper bound: without sequence parallelism "
    "the layer inputs are replicated; only the recomputed layer's attention and MLP split).",
    "Params per TP2 rank counted from the config; 6 B/param (bf16 param + fp32 grad) on "
    "every rank, 12 B/param (fp32 master + Adam) and the optimizer step's transient "
    "(measured per param at TP1) divided by DP (distributed optimizer).",
    "peak = params_grads + optimizer_state + max(activations, optimizer transient); fits "
    "when below card_gib (80e9 bytes).",
]


def in_gib(cut: dict) -> dict:
    """A measured cut in GiB, for reading."""
    return {"params": cut["params"], "params_counted_matches": cut["params_counted_matches"],
            "static_gib": round(cut["static"] / GIB, 2),
            "seq": {s: {"fwd_bwd_peak_gib": round(p["fwd_bwd"] / GIB, 2),
                        "optimizer_peak_gib": round(p["optimizer"] / GIB, 2),
                        "loss": p["loss"]} for s, p in cut["seq"].items()}}


def bench_memory(device: torch.device, work: str, spec: dict) -> dict:
    measured = {}
    for layers in spec["cut_layers"]:
        measured[str(layers)] = measure_cut(device, work, spec, layers)
        free_memory()
    return {"shape": spec["shape"], "recompute": spec["recompute"],
            "measured_tp1": {k: in_gib(cut) for k, cut in measured.items()},
            "raw_bytes": measured, "extrapolated": extrapolate(measured, spec["shape"]),
            "method": EXTRAPOLATION_METHOD}


def write_json(out: dict, path: str | None) -> None:
    """Write ``out`` to ``path`` atomically (after every section: a later section that runs
    past its time limit loses none of the earlier figures)."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, path)


def run_section(out: dict, name: str, fn, path: str | None = None) -> None:
    """Run one section into ``out[name]``; an error is recorded there, not raised. The JSON
    so far is written to ``path`` afterwards."""
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            out[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
        out["failed"].append(name)
    free_memory()
    out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out, path)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


SECTIONS = ("matmul_peak", "train_step", "packing", "memory_7b")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every code path on CPU at toy sizes (figures meaningless)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --cpu-smoke to check the code on CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    if args.cpu_smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    spec = SMOKE if args.cpu_smoke else FULL
    t0 = time.perf_counter()
    out = {"device": device_name(device), "smoke": args.cpu_smoke, "torch": torch.__version__,
           "cuda": torch.version.cuda, "failed": []}
    work = tempfile.mkdtemp(prefix="gpu_bench_")
    try:
        if "matmul_peak" in args.sections:
            run_section(out, "matmul_peak", lambda: matmul_tflops(device, spec["matmul_n"]),
                        args.out)
        peak = out.get("matmul_peak", {}).get("tflops")
        datasheet = out.get("matmul_peak", {}).get("spec")
        if "train_step" in args.sections:
            run_section(out, "train_step",
                        lambda: bench_train_step(device, work, spec["train"], peak, datasheet),
                        args.out)
        if "packing" in args.sections:
            run_section(out, "packing", lambda: bench_packing(device, work, spec["packing"]),
                        args.out)
        if "memory_7b" in args.sections:
            run_section(out, "memory_7b", lambda: bench_memory(device, work, spec["memory"]),
                        args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out, args.out)
    print(json.dumps(out, indent=1), flush=True)
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
