"""The embedded task: short chains of single-digit arithmetic, generated from a seed.

A record looks like::

    prompt:        "Start with 5, add 3, then multiply by 2."
    demonstration: "<think> 5 + 3 = 8. 8 * 2 = 16. </think> \\boxed{16}"
    answer:        "16"

It is small enough that a 2-4 layer model trained for a few minutes on CPU learns the format
from the demonstrations and then gets some answers right, so the rollout reward moves within
tens of SRFT steps. :func:`write_embedded_dataset` writes it as jsonl with the standard field
names, so it goes through the same loading code as user data.
"""
from __future__ import annotations

import json
import os
import random

OPS = ("add", "subtract", "multiply")
EMBEDDED_TASK = dict(min_steps=2, max_steps=2, max_value=10)
"""The task of the embedded demo: two steps, values 1..10 (learnable by the tiny policy)."""
_VERB = {"add": "add {d}", "subtract": "subtract {d}", "multiply": "multiply by {d}"}
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}


def _apply(op: str, x: int, d: int) -> int:
    return x + d if op == "add" else x - d if op == "subtract" else x * d


def _choose_step(rng: random.Random, x: int, max_value: int) -> tuple[str, int]:
    """One operation that keeps the running value in 1..max_value (no constant answer 0)."""
    while True:
        op = rng.choice(OPS)
        if op == "multiply":
            if 2 * x > max_value:
                continue
            d = rng.randint(2, min(3, max_value // x))
        elif op == "subtract":
            if x < 2:
                continue
            d = rng.randint(1, min(9, x - 1))
        else:
            if x + 1 > max_value:
                continue
            d = rng.randint(1, min(9, max_value - x))
        return op, d


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3,
                 max_value: int = 20) -> dict:
    """One record: ``{"prompt", "demonstration", "answer"}``."""
    x = rng.randint(1, 9)
    steps = []
    value = x
    for _ in range(rng.randint(min_steps, max_steps)):
        op, d = _choose_step(rng, value, max_value)
        new = _apply(op, value, d)
        steps.append((op, d, value, new))
        value = new
    verbs = [_VERB[op].format(d=d) for op, d, _, _ in steps]
    if len(verbs) > 1:
        verbs[-1] = "then " + verbs[-1]
    prompt = f"Start with {x}, " + ", ".join(verbs) + "."
    work = " ".join(f"{a} {_SYMBOL[op]} {d} = {b}." for op, d, a, b in steps)
    demo = f"<think> {work} </think> \\boxed{{{value}}}"
    return {"prompt": prompt, "demonstration": demo, "answer": str(value)}


def generate_embedded(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3,
                      max_value: int = 20) -> list:
    """``n`` records, a pure function of the arguments. ``max_value`` bounds every
    intermediate value (start values are 1..9), which sets how many arithmetic facts the
    model has to learn."""
    if n < 1 or not 1 <= min_steps <= max_steps or max_value < 10:
        raise ValueError(f"generate_embedded: need n >= 1, 1 <= min_steps <= max_steps and "
                         f"max_value >= 10, got n={n}, min_steps={min_steps}, "
                         f"max_steps={max_steps}, max_value={max_value}")
    rng = random.Random(seed)
    return [make_problem(rng, min_steps, max_steps, max_value) for _ in range(n)]


def write_embedded_dataset(path: str, n: int = 2000, seed: int = 0, min_steps: int = 2,
                           max_steps: int = 3, max_value: int = 20) -> str:
    """Write ``n`` records as jsonl (fields prompt / demonstration / answer); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in generate_embedded(n, seed, min_steps, max_steps, max_value):
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path
