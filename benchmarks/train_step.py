"""Training-phase throughput: packed token-budget micro-batches vs padded ones, one process.

Real (unpadded) tokens per second of ``Policy.train_on`` (the old-policy pass plus one
optimizer step, fp32 on CPU here) for two response-length distributions:
- ``demo``: the embedded task's demonstrations, tokenized (the demo trains on these and on
  rollouts of similar length);
- ``long_tail``: like a math RL run, most responses short and a few near the cap.
Padded = ``train.micro_batch_size`` rows padded to the step's longest sequence (the previous
default); packed = ``train.max_tokens_per_micro_batch``. Prints one JSON object with the
ratios packed / padded.

    python benchmarks/train_step.py [--cap 512] [--prompts 8] [--n 7] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT = 16  # prompt tokens of every sequence


def demo_lengths(k: int, seed: int) -> list:
    """Token lengths of the embedded task's demonstrations (k of them, sampled)."""
    from srft_mcore.data.embedded import generate_embedded
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR, load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    records = generate_embedded(n=200, seed=seed)
    lens = [len(tok(r["demonstration"])["input_ids"]) for r in records]
    rng = random.Random(seed)
    return [rng.choice(lens) for _ in range(k)]


def long_tail_lengths(k: int, cap: int, seed: int) -> list:
    """85% short (5-25% of the cap), 15% long (80-100% of the cap)."""
    rng = random.Random(seed)
    return [int(cap * (rng.uniform(0.8, 1.0) if rng.random() < 0.15 else rng.uniform(0.05, 0.25)))
            for _ in range(k)]


def make_step(lengths: list, prompts: int, group: int, vocab: int, seed: int):
    from srft_mcore.training.batching import TrainSequence

    rng = random.Random(seed)
    seqs = []
    for i, n in enumerate(lengths):
        g = i // group
        prompt = [rng.randrange(10, vocab) for _ in range(PROMPT)]
        resp = [rng.randrange(10, vocab) for _ in range(max(n, 1))]
        demo = i % group == group - 1
        seqs.append(TrainSequence(prompt + resp, PROMPT, demo, 1.0 if demo else float(i % 2), g,
                                  advantage=0.5 - (i % 2)))
    return seqs


def time_steps(model_dir: str, seqs, cap: int, extra: list, repeat: int) -> float:
    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer

    cfg = load_config(None, [f"model.hf_path={model_dir}", "optimizer.lr=1e-5",
                             f"train.prompts_per_step={max(s.group for s in seqs) + 1}",
                             f"data.max_prompt_len={PROMPT}", f"data.max_response_len={cap}",
                             *extra])
    t = Trainer(cfg).init_policy()
    t.train_on(seqs)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        t.train_on(seqs)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap", type=int, default=512,
                    help="maximum response length of the long-tailed run (tokens)")
    ap.add_argument("--demo-cap", type=int, default=48,
                    help="maximum response length of the demo run (its config's)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=7, help="rollouts per prompt (+1 demonstration)")
    ap.add_argument("--micro-batch", type=int, default=4, help="padded rows per micro-batch")
    ap.add_argument("--budget-factor", type=float, default=1.0,
                    help="packed tokens per micro-batch, in units of the longest possible "
                         "sequence (prompt + cap)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models.tiny import make_tiny_hf_model

    init_distributed(1, 1)
    k = args.prompts * (args.n + 1)
    out = {"sequences": k, "micro_batch_size": args.micro_batch,
           "budget_factor": args.budget_factor,
           "model": {"hidden": args.hidden, "layers": args.layers}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_hf_model(
            os.path.join(tmp, "model"), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_layers=args.layers, num_heads=4, num_kv_heads=2, max_position_embeddings=8192)
        from srft_mcore.config.hf_config import load_hf_config

        vocab = load_hf_config(model_dir)["vocab_size"]
        runs = (("demo", args.demo_cap, demo_lengths(k, args.seed)),
                ("long_tail", args.cap, long_tail_lengths(k, args.cap, args.seed)))
        for name, cap, lens in runs:
            seqs = make_step([min(n, cap) for n in lens], args.prompts, args.n + 1, vocab,
                             args.seed)
            budget = int(args.budget_factor * (PROMPT + cap))
            real = sum(len(s.tokens) for s in seqs)
            padded = time_steps(model_dir, seqs, cap,
                                [f"train.micro_batch_size={args.micro_batch}"], args.repeat)
            packed = time_steps(model_dir, seqs, cap,
                                [f"train.max_tokens_per_micro_batch={budget}"], args.repeat)
            out[name] = {"cap": cap, "max_tokens_per_micro_batch": budget, "real_tokens": real,
                         "mean_len": real / k, "max_len": max(len(s.tokens) for s in seqs),
                         "padded_tokens_per_s": real / padded,
                         "packed_tokens_per_s": real / packed,
                         "ratio_packed_vs_padded": padded / packed}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
