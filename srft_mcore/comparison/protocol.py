"""The comparison protocol's decisions and statistics: each method's learning rate chosen on
the validation split (and nothing else), 95 % intervals over seeds, paired differences, and
the compute ledger of a run.
"""
from __future__ import annotations

import math
import os
from typing import Optional

# two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30); above, the normal's
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: need df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def mean_ci(values: list) -> dict:
    """n, mean, sample std and the half-width of the 95 % t-interval of the mean (None for
    std and interval below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t975(n - 1) * std / math.sqrt(n)}


def paired_difference(a: dict, b: dict) -> dict:
    """``a - b`` over the seeds both have (seed -> value each): the mean difference with its
    95 % t-interval, paired by seed (the same seeds see the same prompts in the same order)."""
    seeds = sorted(set(a) & set(b), key=str)
    return {**mean_ci([a[s] - b[s] for s in seeds]), "seeds": seeds}


def choose_lr(val_acc: dict) -> Optional[float]:
    """The learning rate with the highest validation accuracy (``lr -> accuracy``; None for
    a run that did not finish). A tie goes to the smaller learning rate. None when no run
    finished."""
    done = {lr: acc for lr, acc in val_acc.items() if acc is not None}
    if not done:
        return None
    best = max(done.values())
    return min(lr for lr, acc in done.items() if acc == best)


def select_lrs(plan, state) -> dict:
    """Per method: the grid's validation accuracies and the chosen lr. Reads each selection
    run's accuracy on ``plan.val_split`` and nothing else: the held-out splits never choose."""
    out = {}
    for method in plan.methods:
        grid = {}
        for lr in plan.lrs:
            run = next(r for r in plan.runs if r.method == method and r.lr == lr
                       and r.seed == plan.seeds[0])
            entry = state.run(run.key)
            grid[lr] = (entry["acc"][plan.val_split]
                        if entry.get("status") == "done" and entry.get("acc") else None)
        out[method] = {"grid": {str(lr): acc for lr, acc in grid.items()},
                       "lr": choose_lr(grid), "split": plan.val_split, "seed": plan.seeds[0]}
    return out


# --------------------------------------------------------------------------- compute ledger
LEDGER_KEYS = ("prompts", "demo_tokens", "rollout_tokens", "trained_tokens")


def model_params(plan) -> Optional[int]:
    """N, the policy's parameter count (embeddings included), from its HF config.json."""
    import json

    from srft_mcore.models.tiny import resolve_model_dir
    from srft_mcore.planning.model_shape import PlanError, hf_param_count, shape_from_hf

    path = os.path.join(resolve_model_dir(plan.base), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return hf_param_count(shape_from_hf(json.load(f)))
        except PlanError:
            return None


def run_ledger(run, entry: dict, n_params: Optional[int]) -> dict:
    """What a run cost: prompts, demonstration tokens trained, rollout tokens generated,
    tokens trained (the trainer's ``ledger/*`` per step, summed over its launches), the
    estimated FLOPs (6N per trained token, 2N per generated token: forward + backward,
    forward only) and the wall time of its launches."""
    from srft_mcore.training.metrics import METRICS_FILE, read_metrics

    totals = dict.fromkeys(LEDGER_KEYS, 0)
    for ph in run.phases:
        path = os.path.join(ph.run_dir, METRICS_FILE)
        for row in (read_metrics(path) if os.path.isfile(path) else []):
            for key in LEDGER_KEYS:
                totals[key] += int(row.get(f"ledger/{key}", 0) or 0)
    flops = (None if n_params is None else
             6 * n_params * totals["trained_tokens"] + 2 * n_params * totals["rollout_tokens"])
    seconds = sum(p.get("seconds", 0.0) for p in entry.get("phases", {}).values())
    return {**totals, "params": n_params, "flops": flops, "seconds": round(seconds, 1)}
