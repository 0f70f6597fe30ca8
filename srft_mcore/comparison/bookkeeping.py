"""A comparison's bookkeeping: ``out/state.json``, what each trainer launch needs on a
re-run (skip, resume, restart, fresh), and the final accuracies of a finished run.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from srft_mcore.comparison.run_plan import CompareError, Phase, Plan, Run

STATE_FILE = "state.json"


class State:
    """``out/state.json``: settings and, per run, the status of its launches and its result.
    Written atomically after every change."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        self.data = {"settings": settings, "runs": {}}
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("settings") != settings:
                diff = {k: (old.get("settings", {}).get(k), v) for k, v in settings.items()
                        if old.get("settings", {}).get(k) != v}
                raise CompareError(
                    f"{os.path.dirname(path)} holds a comparison made with other settings "
                    f"(then, now: {diff}); its runs cannot be mixed with these. Fix: use "
                    f"another --out, or the settings it was started with")
            # the runs and the base model's scores (evaluated once per seed) carry over
            self.data.update({k: v for k, v in old.items() if k != "settings"})

    def run(self, key: str) -> dict:
        return self.data["runs"].setdefault(key, {"status": "pending", "phases": {}})

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", "latest"))


def last_row(run_dir: str, step: int) -> Optional[dict]:
    """The metrics.jsonl record of ``step`` (None when there is none)."""
    from srft_mcore.training.metrics import METRICS_FILE, read_metrics

    path = os.path.join(run_dir, METRICS_FILE)
    rows = [r for r in read_metrics(path) if r["step"] == step] if os.path.isfile(path) else []
    return rows[-1] if rows else None


EVAL_FIELDS = ("acc", "truncation_rate", "mean_tokens")
"""What the final evaluation reports per split (accuracy first)."""


def final_evaluation(plan: Plan, run: Run) -> dict:
    """field -> split -> value of the run's final policy (``acc``, and the truncation rate
    and mean response length when the evaluation reports them); raises RuntimeError when an
    accuracy is missing."""
    if plan.final_eval == "srft-eval":
        path = os.path.join(run.eval_dir, "results.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"srft-eval wrote no {path}")
        with open(path) as f:
            results = json.load(f)["results"]
        found = {field: {name: results[name][field] for name in plan.splits
                         if field in results.get(name, {})} for field in EVAL_FIELDS}
        missing = [name for name in plan.splits if name not in found["acc"]]
        where = path
    else:
        last = run.phases[-1]
        row = last_row(last.run_dir, last.steps) or {}
        found = {field: {s: row[f"eval/{s}/{field}"] for s in plan.splits
                         if f"eval/{s}/{field}" in row} for field in EVAL_FIELDS}
        missing = [s for s in plan.splits if s not in found["acc"]]
        where = f"{last.run_dir}/metrics.jsonl at the final step {last.steps}"
    if missing:
        raise RuntimeError(f"{where} has no accuracy for {missing}")
    return {field: {s: float(v) for s, v in values.items()} for field, values in found.items()
            if values}



def phase_action(ph: Phase, entry: dict) -> str:
    """What a phase needs now: skip (finished) | resume | restart (earlier attempt without a
    checkpoint: its directory is cleared) | fresh."""
    if entry.get("status") == "done":
        return "skip"
    if has_checkpoint(ph.run_dir):
        return "resume"
    return "restart" if os.path.exists(ph.run_dir) else "fresh"
