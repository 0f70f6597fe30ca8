"""Build the embedded default policy: a tiny Qwen2 pre-trained like a base model.

SRFT starts from a base model that knows the facts of its domain but not yet the longer
reasoning the fine-tuning teaches (the paper starts from Qwen2.5-Math-7B). This script plays
that pre-training for the embedded CPU demo: a random 4-layer Qwen2 learns by next-token
prediction from
- "fact sheets", plain text listing the task's one-step facts in random order ("3 + 4 = 7.
  9 - 5 = 4. ..."), so a fact is known wherever it appears, not only at the start of an
  answer (pre-trained on one-step problems alone, the model later memorised whole two-step
  problems instead of computing their second step, and held-out accuracy barely moved);
- one-step problems in the chat format ("Start with 4, add 3." -> "<think> 4 + 3 = 7.
  </think> \\boxed{7}"), and a small share of two- and three-step chains.
The result is weak but not hopeless on the demo's two-step problems (about one in ten right
at temperature 0.6): chaining the steps is what SRFT then has to teach. None of the problems
it sees is in the shipped held-out splits, which this script also (re)writes. The result ships in ``srft_mcore/assets/embedded_model``
with ``pretraining.json`` (its settings and accuracies).

    python tools/make_embedded_model.py [--out DIR] [--steps 800]
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch

from srft_mcore.data.embedded import (EMBEDDED_TASK, PRETRAIN_MIX, PRETRAIN_SEED, fact_sheet,
                                      embedded_eval_splits, make_eval_splits,
                                      pretraining_problems)
from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR, load_tokenizer, make_tiny_hf_model
from srft_mcore.reward import math_reward

SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
             max_position_embeddings=512)
FACT_SHEETS = 6000


def encode(tok, rec):
    prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                     tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    d = tok(rec["demonstration"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, d


@torch.no_grad()
def sampled_accuracy(model, tok, records, temperature=0.6, seed=0, chunk=50):
    """Accuracy of one sample per problem (temperature 0 = greedy), batched, left-padded."""
    model.eval()
    torch.manual_seed(seed)
    hits = 0
    for i in range(0, len(records), chunk):
        recs = records[i:i + chunk]
        prompts = [encode(tok, r)[0] for r in recs]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            att[j, width - len(p):] = 1
        sample = (dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0
                  else dict(do_sample=False))
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=64,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **sample)
        hits += sum(math_reward(tok.decode(out[j, width:], skip_special_tokens=True),
                                r["answer"]) > 0 for j, r in enumerate(recs))
    model.train()
    return hits / len(records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=EMBEDDED_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    random.seed(0)
    splits = make_eval_splits()
    eval_prompts = {json.loads(line)["prompt"] for path in embedded_eval_splits().values()
                    for line in open(path) if line.strip()}
    make_tiny_hf_model(args.out, arch="qwen2", seed=0, **SHAPE)
    tok = load_tokenizer(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    rng = random.Random(PRETRAIN_SEED)
    sheets = [tok(fact_sheet(rng, EMBEDDED_TASK["max_value"]), add_special_tokens=False)
              ["input_ids"] for _ in range(FACT_SHEETS)]
    data = [(ids[:1], ids[1:]) for ids in sheets]  # (context, trained tokens) like a problem
    for n_steps in PRETRAIN_MIX:
        data += [encode(tok, r) for r in pretraining_problems(n_steps, eval_prompts)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
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
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    held_out = {name: [json.loads(line) for line in open(path)] for name, path in splits.items()}
    acc = {f"{name}/t0.6": sampled_accuracy(model, tok, recs) for name, recs in held_out.items()}
    acc.update({f"{name}/greedy": sampled_accuracy(model, tok, recs, temperature=0.0)
                for name, recs in held_out.items()})
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "pretraining.json"), "w") as f:
        json.dump({"steps": args.steps, "lr": args.lr, "batch": args.batch, "shape": SHAPE,
                   "fact_sheets": FACT_SHEETS, "problems_per_chain_length": PRETRAIN_MIX,
                   "data_seed": PRETRAIN_SEED,
                   "held_out_accuracy": acc}, f, indent=1)
    print(f"saved {args.out} after {args.steps} steps; held-out accuracy {acc}")


if __name__ == "__main__":
    main()
