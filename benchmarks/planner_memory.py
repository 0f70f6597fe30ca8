"""Measured peak memory of small trainer runs on CPU against srft-plan's estimate.

Each case builds a small random Qwen2/Llama policy with the trainer's own path
(``Trainer.init_policy`` + ``Policy.train_on``: Megatron's local layer spec, the
old-policy pass, the fused SRFT loss, the optimizer step) and runs two steps of
equal-length sequences under ``torch.profiler`` with ``profile_memory=True``. The profiler
reports the allocations and frees of torch's CPU allocator; the bytes they hold, tracked by
address, peak at the measured value (per rank; the largest rank counts; with several ranks,
the smaller of two runs, see :func:`held_bytes` for why). The planner estimates the same
run with the case's dtype (fp32 unless it says), ``spec=local``, torch's Adam and no fixed
overhead (CUDA context, NCCL and fragmentation do not exist here).

    python benchmarks/planner_memory.py [--cases NAME ...] [--out FILE]

prints one JSON object: per case the measured and estimated peak (MiB) and the relative
error (estimate / measured - 1), and the largest absolute error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MIB = 2**20

# model: tiny_hf_config keywords; run: prompts, n_samples, prompt/response length,
# micro-batch; layout: tp, dp (ranks = tp * dp; dp > 1 uses the distributed optimizer);
# dtype: model.dtype (default float32)
CASES = {
    "qwen2_h256": dict(model=dict(arch="qwen2", hidden_size=256, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=768, vocab_size=2048),
                       run=dict(prompts=2, n_samples=1, prompt_len=64, response_len=448,
                                micro_batch=1), tp=1, dp=1),
    "llama_tied_h384": dict(model=dict(arch="llama", hidden_size=384, num_layers=3, num_heads=6,
                                       num_kv_heads=2, intermediate_size=1024, vocab_size=4096,
                                       tied=True),
                            run=dict(prompts=2, n_samples=2, prompt_len=32, response_len=224,
                                     micro_batch=2), tp=1, dp=1),
    "qwen2_mha_long": dict(model=dict(arch="qwen2", hidden_size=128, num_layers=2, num_heads=4,
                                      num_kv_heads=4, intermediate_size=512, vocab_size=1024),
                           run=dict(prompts=1, n_samples=1, prompt_len=64, response_len=960,
                                    micro_batch=1), tp=1, dp=1),
    "qwen2_vocab32k": dict(model=dict(arch="qwen2", hidden_size=256, num_layers=2, num_heads=4,
                                      num_kv_heads=2, intermediate_size=768, vocab_size=32000),
                           run=dict(prompts=2, n_samples=1, prompt_len=64, response_len=1536,
                                    micro_batch=1), tp=1, dp=1),
    "qwen2_tp2": dict(model=dict(arch="qwen2", hidden_size=256, num_layers=2, num_heads=4,
                                 num_kv_heads=2, intermediate_size=768, vocab_size=2048),
                      run=dict(prompts=2, n_samples=1, prompt_len=64, response_len=448,
                               micro_batch=1), tp=2, dp=1),
    "qwen2_bf16": dict(model=dict(arch="qwen2", hidden_size=256, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=768, vocab_size=8192),
                       run=dict(prompts=2, n_samples=1, prompt_len=64, response_len=448,
                                micro_batch=1), tp=1, dp=1, dtype="bfloat16"),
    "qwen2_dp2_distopt": dict(model=dict(arch="qwen2", hidden_size=256, num_layers=2,
                                         num_heads=4, num_kv_heads=2, intermediate_size=768,
                                         vocab_size=8192),
                              run=dict(prompts=2, n_samples=1, prompt_len=64, response_len=448,
                                       micro_batch=1), tp=1, dp=2),
}
QUICK = ("qwen2_h256",)
"""The case the test runs (one process, a few seconds)."""


# --------------------------------------------------------------------------- measuring
def _allocations(prof) -> list:
    """(time, address, bytes) of every CPU allocation (+) and free (-) the profiler saw."""
    from torch._C._profiler import _EventType

    out, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            out.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
    return sorted(out)


def held_bytes(allocations: list) -> tuple:
    """(peak, end) of the bytes held by tensors, tracked by address.

    A free that happens on a thread the profiler does not see (gloo's worker threads drop
    the last reference to a collective's tensors) is never reported; when the allocator
    hands out that address again, the old block was evidently freed, so it is dropped
    then; a block whose address is not reused before the peak still counts, so such a miss
    can only raise a run's peak (seen once in about ten 2-rank runs: +22 MiB, one copy of
    the weights). Frees of blocks allocated before profiling started count nothing."""
    live, held, peak = {}, 0, 0
    for _, ptr, size in allocations:
        if size > 0:
            held -= live.pop(ptr, 0)
            live[ptr] = size
            held += size
            peak = max(peak, held)
        else:
            held -= live.pop(ptr, 0)
    return peak, held


def tracked_peak(fn) -> dict:
    """Run ``fn()`` under torch.profiler(profile_memory=True): the peak and final bytes held
    by tensors of torch's CPU allocator (:func:`held_bytes`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocations = _allocations(prof)
    peak, end = held_bytes(allocations)
    return {"peak": peak, "end": end, "events": len(allocations), "result": result}


def hf_config(case: dict):
    """The case's transformers config (context long enough for its sequences)."""
    from srft_mcore.models.tiny import tiny_hf_config

    kwargs = {k: v for k, v in case["model"].items() if k != "arch"}
    positions = max(1024, case["run"]["prompt_len"] + case["run"]["response_len"])
    return tiny_hf_config(case["model"]["arch"], max_position_embeddings=positions, **kwargs)


def make_model_dir(root: str, case: dict) -> str:
    """A HF config.json (+ the embedded tokenizer) of the case's model; no weights."""
    from srft_mcore.models.tiny import TOKENIZER_DIR

    path = tempfile.mkdtemp(prefix="model_", dir=root)
    hf_config(case).save_pretrained(path)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(path, name))
    return path


def synthetic_step(run: dict, vocab: int, seed: int = 0) -> list:
    """One step of equal-length sequences: per prompt ``n_samples`` rollouts (alternately
    rewarded, with SGLang-like log-probs) and the demonstration."""
    import torch

    from srft_mcore.training.batching import TrainSequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for group in range(run["prompts"]):
        prompt = torch.randint(10, vocab, (run["prompt_len"],), generator=g).tolist()
        for j in range(run["n_samples"] + 1):
            demo = j == run["n_samples"]
            reward = 1.0 if demo or j % 2 else 0.0
            response = torch.randint(10, vocab, (run["response_len"],), generator=g).tolist()
            logprobs = None if demo else (-torch.rand(run["response_len"], generator=g)).tolist()
            seqs.append(TrainSequence(prompt + response, run["prompt_len"], demo, reward, group,
                                      advantage=reward - 0.5, rollout_logprobs=logprobs))
    return seqs


def _rank_measure(case: dict, model_dir: str, run_dir: str) -> dict:
    """On one rank: the trainer's policy and two train steps, profiled from the start."""
    import torch

    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer

    torch.set_num_threads(1)
    run = case["run"]
    overrides = [f"model.hf_path={model_dir}", "model.load_hf_weights=false",
                 f"model.dtype={case.get('dtype', 'float32')}", "model.transformer_impl=local",
                 f"parallel.tp={case['tp']}", "parallel.use_distributed_optimizer=true",
                 f"train.prompts_per_step={run['prompts']}",
                 f"rollout.n_samples={run['n_samples']}",
                 f"train.micro_batch_size={run['micro_batch']}",
                 f"data.max_prompt_len={run['prompt_len']}",
                 f"data.max_response_len={run['response_len']}",
                 "algorithm.name=srft", f"logging.run_dir={run_dir}"]
    seqs = synthetic_step(run, case["model"]["vocab_size"])

    def steps():
        trainer = Trainer(load_config(None, overrides)).init_policy()
        for _ in range(2):  # the first step allocates Adam's state
            metrics = trainer.train_on(seqs)
        return trainer, metrics  # the trainer is alive at the end: "end" is what it holds

    out = tracked_peak(steps)
    trainer, metrics = out.pop("result")
    return {**out, "loss": metrics.get("loss"),
            "params": sum(p.numel() for p in trainer.model.parameters())}


def measure(case: dict, work: str) -> dict:
    """The case's measured peak: the largest of its ranks, each a fresh process (Megatron's
    global buffers and caches start empty)."""
    from srft_mcore.launching.local import spawn_ranks

    model_dir = make_model_dir(work, case)
    run_dir = tempfile.mkdtemp(prefix="run_", dir=work)
    ranks = spawn_ranks(_rank_measure, case["tp"] * case["dp"],
                        args=(case, model_dir, run_dir), timeout_s=600)
    return {"peak": max(r["peak"] for r in ranks), "end": max(r["end"] for r in ranks),
            "ranks": ranks}


# --------------------------------------------------------------------------- estimating
def estimate(case: dict) -> dict:
    """srft-plan's peak for the case: its dtype (fp32 unless it says), local spec, torch
    Adam, no fixed overhead."""
    from srft_mcore.planning.memory_estimate import trainer_memory
    from srft_mcore.planning.model_shape import shape_from_hf, stage_params
    from srft_mcore.planning.run_shape import Assumptions, Layout, RunShape

    shape = shape_from_hf(hf_config(case).to_dict(), "case")
    run = case["run"]
    run_shape = RunShape(prompts_per_step=run["prompts"], n_samples=run["n_samples"],
                         prompt_len=run["prompt_len"], response_len=run["response_len"],
                         micro_batch=run["micro_batch"], mini_batches=1)
    a = Assumptions(dtype=case.get("dtype", "float32"), spec="local", fused_adam=False,
                    overhead_gib=0.0)
    lay = Layout(tp=case["tp"], pp=1, dp=case["dp"], distributed_optimizer=case["dp"] > 1)
    mem = trainer_memory(shape, run_shape, lay, a)
    return {"peak": mem.peak, "terms": mem.terms, "resident": mem.resident,
            "params_per_rank": stage_params(shape, case["tp"], 1, "last")}


def compare(name: str, work: str, repeats: int = 2) -> dict:
    """Measured (the smallest peak of ``repeats`` runs when there are several ranks: a free
    on a gloo thread that goes unseen can only add to a run's peak) against estimated."""
    case = CASES[name]
    t0 = time.perf_counter()
    runs = 1 if case["tp"] * case["dp"] == 1 else max(1, repeats)
    got = min((measure(case, work) for _ in range(runs)), key=lambda g: g["peak"])
    est = estimate(case)
    return {"case": name, "tp": case["tp"], "dp": case["dp"],
            "dtype": case.get("dtype", "float32"), "model": case["model"],
            "run": case["run"], "measured_mib": round(got["peak"] / MIB, 2),
            "estimated_mib": round(est["peak"] / MIB, 2),
            "error": round(est["peak"] / got["peak"] - 1, 4),
            "measured_end_mib": round(got["end"] / MIB, 2),
            "estimated_resident_mib": round(est["resident"] / MIB, 2),
            "params_per_rank": {"model": got["ranks"][0]["params"],
                                "planner": est["params_per_rank"]},
            "estimate_terms_mib": {k: round(v / MIB, 2) for k, v in est["terms"].items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = tempfile.mkdtemp(prefix="planner_memory_")
    try:
        results = [compare(name, work) for name in args.cases]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"cases": results, "max_abs_error": max(abs(r["error"]) for r in results)}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
