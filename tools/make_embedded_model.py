"""Build the embedded default policy: a tiny Qwen2 briefly pre-trained on the embedded task.

SRFT starts from a model that already speaks the task's format now and then (the paper
starts from Qwen2.5-Math-7B). This script plays the part of that pre-training for the
embedded CPU demo: it trains the tiny random Qwen2 with plain next-token SFT on
demonstrations from a seed disjoint from the training data, and stops as soon as the
sampled accuracy (temperature 1) reaches ``--target-acc``, so that the demo starts from a
weak but non-zero policy. The result ships in ``srft_mcore/assets/embedded_model``.

    python tools/make_embedded_model.py [--out DIR] [--target-acc 0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch

from srft_mcore.data import EMBEDDED_TASK, generate_embedded
from srft_mcore.models.tiny import load_tokenizer, make_tiny_hf_model
from srft_mcore.reward import math_reward

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "srft_mcore",
                     "assets", "embedded_model")
SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
             max_position_embeddings=512)
PRETRAIN_SEED = 987_654  # the training data uses other seeds


def encode(tok, rec):
    prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                     tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    d = tok(rec["demonstration"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, d


@torch.no_grad()
def sampled_accuracy(model, tok, records, seed=0):
    torch.manual_seed(seed)
    hits = 0
    for rec in records:
        p, _ = encode(tok, rec)
        out = model.generate(torch.tensor([p]), do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=48, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        hits += math_reward(tok.decode(out[0, len(p):], skip_special_tokens=True),
                            rec["answer"]) > 0
    return hits / len(records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=ASSET)
    ap.add_argument("--target-acc", type=float, default=0.1)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    random.seed(0)
    make_tiny_hf_model(args.out, arch="qwen2", seed=0, **SHAPE)
    tok = load_tokenizer(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    records = generate_embedded(4000, seed=PRETRAIN_SEED, **EMBEDDED_TASK)
    held_out = generate_embedded(64, seed=PRETRAIN_SEED + 1, **EMBEDDED_TASK)
    data = [encode(tok, r) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    acc, step = 0.0, 0
    for step in range(1, args.max_steps + 1):
        batch = random.sample(data, args.batch)
        width = max(len(p) + len(d) for p, d in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (p, d) in enumerate(batch):
            seq = torch.tensor(p + d)
            ids[i, :len(seq)] = seq
            labels[i, len(p):len(seq)] = torch.tensor(d)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            model.eval()
            acc = sampled_accuracy(model, tok, held_out)
            model.train()
            print(f"step {step}: loss {loss.item():.3f}, sampled accuracy {acc:.3f}", flush=True)
            if acc >= args.target_acc:
                break
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "pretraining.json"), "w") as f:
        json.dump({"steps": step, "sampled_accuracy": acc, "lr": args.lr, "batch": args.batch,
                   "data_seed": PRETRAIN_SEED, "records": len(records)}, f, indent=1)
    print(f"saved {args.out} after {step} steps (sampled accuracy {acc:.3f})")


if __name__ == "__main__":
    main()
