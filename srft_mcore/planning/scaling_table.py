"""One table over several training runs (a scaling study): model, layout, step time,
tokens/s, peak memory and held-out accuracy, read from each run's ``config.yaml`` and
``metrics.jsonl``.

    python -m srft_mcore.planning.scaling_table RUN_DIR [RUN_DIR ...] [--json]

Per run (rows in the order given; a directory without metrics.jsonl is listed as not run):

- step s: the median over the logged steps (the first one left out when there are more:
  it pays for start-up and compilation) of ``time/step`` less ``time/eval``;
- tokens/s: trained tokens per second of that step time; a step's trained tokens are
  ``perf/train_tokens_per_s * time/train``; train tok/s: ``perf/train_tokens_per_s`` alone
  (the training phase), median;
- peak GB: the largest ``perf/peak_mem_gb`` logged (the trainer's peak memory per GPU),
  ``-`` when the run has no such metric;
- acc NAME: the last ``eval/NAME/acc`` of the run, after the first one logged (``0.21 ->
  0.45``; step 0 holds the start policy's when eval.every is set).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Optional, Sequence

import yaml

from srft_mcore.training.metrics import METRICS_FILE, read_metrics

PEAK_MEM_KEY = "perf/peak_mem_gb"


def _num(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def describe_layout(cfg: dict) -> str:
    """``TP2 PP1 DP4, recompute; rollout 2 x TP2`` from a saved config (a dict)."""
    par, model, roll = cfg.get("parallel", {}), cfg.get("model", {}), cfg.get("rollout", {})
    text = f"TP{par.get('tp', 1)} PP{par.get('pp', 1)} DP{par.get('dp') or '?'}"
    if model.get("recompute_granularity"):
        text += f", recompute {model['recompute_granularity']}"
    if roll.get("urls"):
        n = len(roll["urls"])
        where = f"{n} server{'' if n == 1 else 's'} by URL"
    else:
        where = f"{roll.get('num_servers', 1)} x TP{roll.get('server_tp', 1)}"
        if roll.get("weight_sync") == "tensor":
            where += " colocated"
    if roll.get("router") or roll.get("router_url"):
        where += " + router"
    return f"{text}; rollout {where}"


def model_name(cfg: dict) -> str:
    path = (cfg.get("model") or {}).get("hf_path")
    return os.path.basename(os.path.normpath(path)) if path else "embedded tiny"


def summarize_run(run_dir: str, name: Optional[str] = None) -> dict:
    """The table row of one run directory (see the module docstring)."""
    name = name or os.path.basename(os.path.normpath(run_dir))
    cfg = {}
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
    row = {"name": name, "run_dir": run_dir, "model": model_name(cfg) if cfg else "?",
           "layout": describe_layout(cfg) if cfg else "?", "steps": 0, "step_s": None,
           "tokens_per_s": None, "train_tokens_per_s": None, "peak_mem_gb": None, "acc": {}}
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        return row
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r["step"] > 0 and _num(r, "time/step") is not None]
    row["steps"] = max((r["step"] for r in steps), default=0)
    timed = steps[1:] if len(steps) > 1 else steps
    step_s, tok_s, train_tok_s = [], [], []
    for r in timed:
        t = _num(r, "time/step") - (_num(r, "time/eval") or 0.0)
        step_s.append(t)
        rate, t_train = _num(r, "perf/train_tokens_per_s"), _num(r, "time/train")
        if rate is not None:
            train_tok_s.append(rate)
            if t_train is not None and t > 0:
                tok_s.append(rate * t_train / t)
    if step_s:
        row["step_s"] = statistics.median(step_s)
    if tok_s:
        row["tokens_per_s"] = statistics.median(tok_s)
    if train_tok_s:
        row["train_tokens_per_s"] = statistics.median(train_tok_s)
    peaks = [v for v in (_num(r, PEAK_MEM_KEY) for r in rows) if v is not None]
    row["peak_mem_gb"] = max(peaks) if peaks else None
    for r in rows:
        for key in r:
            if key.startswith("eval/") and key.endswith("/acc") and _num(r, key) is not None:
                split = key[len("eval/"):-len("/acc")]
                first_last = row["acc"].setdefault(split, [_num(r, key), None])
                first_last[1] = _num(r, key)
    return row


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _acc(pair: Optional[list]) -> str:
    if not pair:
        return "-"
    first, last = pair
    return f"{last:.3f}" if first == last else f"{first:.3f} -> {last:.3f}"


def format_table(rows: Sequence[dict]) -> str:
    """The rows as one Markdown table, one ``acc`` column per held-out split."""
    splits = sorted({s for r in rows for s in r["acc"]})
    head = ["run", "model", "layout", "steps", "step s", "tokens/s", "train tok/s", "peak GB",
            *[f"acc {s}" for s in splits]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["model"], r["layout"],
                 str(r["steps"]) if r["steps"] else "not run",
                 _fmt(r["step_s"], ".2f"), _fmt(r["tokens_per_s"], ",.0f"),
                 _fmt(r["train_tokens_per_s"], ",.0f"), _fmt(r["peak_mem_gb"], ".1f"),
                 *[_acc(r["acc"].get(s)) for s in splits]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srft_mcore.planning.scaling_table",
                                 description="One table (model, layout, step time, tokens/s, "
                                 "peak memory, held-out accuracy) over training runs.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (logging.run_dir), in order")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = ap.parse_args(argv)
    rows = [summarize_run(d) for d in args.run_dirs]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
