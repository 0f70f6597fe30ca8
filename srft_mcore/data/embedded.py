"""The embedded task: short chains of single-digit arithmetic, generated from a seed.

A record looks like::

    prompt:        "Start with 5, add 3, then multiply by 2."
    demonstration: "<think> 5 + 3 = 8. 8 * 2 = 16. </think> \\boxed{16}"
    answer:        "16"

The embedded demo trains on two-step chains with values 1..10 (:data:`EMBEDDED_TASK`, 870
distinct problems). Three evaluation splits ship with the package, each of 200 distinct
problems that the training data never contains (it is drawn with them excluded):

- ``val`` (:func:`embedded_validation_split`): two-step problems from the training
  distribution, for choosing settings (learning rates, forms); never a reported result;
- ``id`` (:func:`embedded_eval_splits`): two-step problems, disjoint from ``val``, so that
  ``eval/id/acc`` measures generalisation to new combinations of known facts, not recall;
- ``ood`` (:func:`embedded_eval_splits`): four-step chains. The base model's pre-training
  (``tools/make_embedded_model.py``) holds chains of one to three steps and the fine-tuning
  data two, so a four-step chain is new in kind to both; its demonstrations are about 46
  tokens long (evaluate with ``eval.max_new_tokens`` >= 56). :func:`write_embedded_dataset` writes records as jsonl with the standard field names,
so they go through the same loading code as user data.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable

from .loading import write_jsonl

OPS = ("add", "subtract", "multiply")
EMBEDDED_TASK = dict(min_steps=2, max_steps=2, max_value=10)
"""The task of the embedded demo: two steps, values 1..10 (learnable by the tiny policy)."""
EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "embedded_eval")
EVAL_SPLITS = {"id": (dict(EMBEDDED_TASK), 101),
               "ood": (dict(EMBEDDED_TASK, min_steps=4, max_steps=4), 102)}
"""The shipped held-out splits: name -> (task, seed); 200 distinct problems each."""
VALIDATION = ("val", dict(EMBEDDED_TASK), 103)
"""The shipped validation split (name, task, seed): drawn after ``id`` and ``ood``, disjoint
from them and from the base model's pre-training problems (as ``id`` is)."""
PRETRAIN_SEED = 987_654  # the demo's training data uses other seeds
PRETRAIN_MIX = {1: 3000, 2: 300, 3: 300}
"""The base model's pre-training problems per chain length (tools/make_embedded_model.py):
the answer format, and a glimpse of longer chains."""
EVAL_SIZE = 200
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


def fact_sheet(rng: random.Random, max_value: int = 10, n_min: int = 4, n_max: int = 8) -> str:
    """Plain text of ``n_min..n_max`` random one-step facts of the task ("3 + 4 = 7. 9 - 5 =
    4. ..."): the arithmetic a base model has read somewhere, in no particular context."""
    facts = []
    for _ in range(rng.randint(n_min, n_max)):
        x = rng.randint(1, 9)
        op, d = _choose_step(rng, x, max_value)
        facts.append(f"{x} {_SYMBOL[op]} {d} = {_apply(op, x, d)}.")
    return " ".join(facts)


def generate_embedded(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3,
                      max_value: int = 20, exclude: Iterable[str] = (),
                      distinct: bool = False) -> list:
    """``n`` records, a pure function of the arguments. ``max_value`` bounds every
    intermediate value (start values are 1..9), which sets how many arithmetic facts the
    model has to learn. Prompts in ``exclude`` are never produced (held-out problems);
    ``distinct=True`` produces each prompt at most once."""
    if n < 1 or not 1 <= min_steps <= max_steps or max_value < 10:
        raise ValueError(f"generate_embedded: need n >= 1, 1 <= min_steps <= max_steps and "
                         f"max_value >= 10, got n={n}, min_steps={min_steps}, "
                         f"max_steps={max_steps}, max_value={max_value}")
    rng = random.Random(seed)
    skip, out = set(exclude), []
    for _ in range(200 * n):  # bounded: a task with too few problems is an error, not a hang
        rec = make_problem(rng, min_steps, max_steps, max_value)
        if rec["prompt"] in skip:
            continue
        out.append(rec)
        if distinct:
            skip.add(rec["prompt"])
        if len(out) == n:
            return out
    raise ValueError(f"generate_embedded: the task (steps {min_steps}..{max_steps}, values up "
                     f"to {max_value}) has fewer than {n} problems outside the {len(skip)} "
                     f"excluded ones; ask for fewer records or a larger max_value")


def write_embedded_dataset(path: str, n: int = 2000, seed: int = 0, min_steps: int = 2,
                           max_steps: int = 3, max_value: int = 20,
                           exclude: Iterable[str] = ()) -> str:
    """Write ``n`` records as jsonl (fields prompt / demonstration / answer); returns path."""
    return write_jsonl(path, generate_embedded(n, seed, min_steps, max_steps, max_value,
                                                 exclude=exclude))


def embedded_eval_splits() -> dict:
    """The shipped held-out splits of the embedded task: ``{"id": path, "ood": path}``."""
    return {name: os.path.join(EVAL_DIR, f"{name}.jsonl") for name in EVAL_SPLITS}


def embedded_validation_split() -> dict:
    """The shipped validation split: ``{"val": path}`` (settings are chosen on it)."""
    return {VALIDATION[0]: os.path.join(EVAL_DIR, f"{VALIDATION[0]}.jsonl")}


def held_out_prompts() -> set:
    """Prompts of the shipped evaluation splits (validation included): training data of the
    embedded task skips them."""
    prompts = set()
    for path in [*embedded_eval_splits().values(), *embedded_validation_split().values()]:
        with open(path) as f:
            prompts.update(json.loads(line)["prompt"] for line in f if line.strip())
    return prompts


def pretraining_problems(n_steps: int, held_out: Iterable[str]) -> list:
    """The base model's pre-training problems of one chain length; ``held_out``: the prompts
    of the held-out splits ``id`` and ``ood``, which pre-training never sees."""
    task = dict(EMBEDDED_TASK, min_steps=n_steps, max_steps=n_steps)
    return generate_embedded(PRETRAIN_MIX[n_steps], seed=PRETRAIN_SEED + n_steps,
                             exclude=held_out, **task)


def make_eval_splits(out_dir: str = EVAL_DIR) -> dict:
    """(Re)generate the shipped evaluation splits (tools/make_embedded_model.py calls this):
    the held-out ones, then the validation split without their prompts and without the
    pre-training problems."""
    paths, held_out = {}, set()
    for name, (task, seed) in EVAL_SPLITS.items():
        records = generate_embedded(EVAL_SIZE, seed, distinct=True, **task)
        held_out.update(r["prompt"] for r in records)
        paths[name] = write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), records)
    taken = held_out | {r["prompt"] for n in PRETRAIN_MIX
                        for r in pretraining_problems(n, held_out)}
    name, task, seed = VALIDATION
    paths[name] = write_jsonl(os.path.join(out_dir, f"{name}.jsonl"),
                              generate_embedded(EVAL_SIZE, seed, distinct=True, exclude=taken,
                                                **task))
    return paths
