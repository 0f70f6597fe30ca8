"""A comparison's results: per method and split the mean +- std over seeds, the Markdown
table, ``results.json``, and the curves (held-out accuracy, entropy) averaged over seeds.
"""
from __future__ import annotations

import json
import math
import os

from srft_mcore.comparison.bookkeeping import State
from srft_mcore.comparison.run_plan import METHODS, Plan, Run, split_steps

CURVES = (("eval/{split}/acc", "held-out accuracy ({split})", "eval_{split}_acc.png"),
          ("entropy/step", "policy entropy H (rollout tokens)", "entropy.png"))


def mean_std(values: list) -> dict:
    """n, mean and the sample standard deviation (n - 1; None below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def aggregate(plan: Plan, state: State) -> dict:
    """Per method: its label, seeds, and per split the mean +- std over the finished seeds
    and every seed's value."""
    out = {}
    for method in plan.methods:
        runs = [r for r in plan.runs if r.method == method]
        entries = {r.seed: state.run(r.key) for r in runs}
        done = {s: e["acc"] for s, e in entries.items()
                if e.get("status") == "done" and e.get("acc")}
        splits = {}
        for name in plan.splits:
            values = {str(s): a[name] for s, a in done.items()}
            splits[name] = {**mean_std(list(values.values())), "values": values}
        out[method] = {"label": METHODS[method][0], "seeds": [r.seed for r in runs],
                       "finished": sorted(done), "splits": splits}
    return out


def pct(stats: dict) -> str:
    if not stats["n"]:
        return "-"
    text = f"{100 * stats['mean']:.1f}"
    return text + (f" ± {100 * stats['std']:.1f}" if stats["std"] is not None else "")


def markdown_table(plan: Plan, methods: dict, failed: list) -> str:
    b = plan.budget()
    e = plan.base.eval
    if plan.final_eval == "srft-eval":
        limit = f", first {plan.eval_limit} problems" if plan.eval_limit else ""
        how = (f"srft-eval on the final policy (temperature {e.temperature}, "
               f"{e.n_samples} sample(s) per problem{limit}, sampling seed = run seed)")
    else:
        how = "the trainer's evaluation at the final step"
    lines = [f"Final held-out accuracy (%), mean ± sample std over seeds; {how}. Every method: "
             f"{b['steps']} steps x {b['prompts_per_step']} prompts x "
             f"{b['rollouts_per_prompt']} rollouts (SFT->RL: {b['sft_rl_steps'][0]} SFT + "
             f"{b['sft_rl_steps'][1]} GRPO steps).", "",
             "| method | " + " | ".join(plan.splits) + " | seeds |",
             "|---|" + "---|" * len(plan.splits) + "---|"]
    for m in methods.values():
        cells = [pct(m["splits"][s]) for s in plan.splits]
        lines.append(f"| {m['label']} | " + " | ".join(cells)
                     + f" | {len(m['finished'])}/{len(m['seeds'])} |")
    if failed:
        lines += ["", "Failed runs:"] + [f"- {f['run']}: {f['error']} (log: {f['log']})"
                                         for f in failed]
    return "\n".join(lines) + "\n"


def run_curves(run: Run) -> list:
    """metrics.jsonl of the run as one series of steps (the RL run of SFT->RL continues the
    SFT run's step count; its step-0 evaluation repeats the SFT run's last one and is
    dropped)."""
    from srft_mcore.training.metrics import METRICS_FILE, read_metrics

    rows, offset = [], 0
    for i, ph in enumerate(run.phases):
        path = os.path.join(ph.run_dir, METRICS_FILE)
        if os.path.isfile(path):
            rows += [dict(r, step=r["step"] + offset) for r in read_metrics(path)
                     if not (i and r["step"] == 0)]
        offset += ph.steps
    return rows


def mean_curve(runs_rows: list, key: str) -> tuple:
    """(steps, mean, std) over the runs at each step where any run has ``key``."""
    from srft_mcore.training.plot import _series

    by_step = {}
    for rows in runs_rows:
        for x, y in zip(*_series(rows, key)):
            if math.isfinite(y):
                by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [s["mean"] for s in stats], [s["std"] or 0.0 for s in stats]


def plot_curves(plan: Plan, state: State) -> list:
    """One PNG per curve (held-out accuracy per split, entropy): a line per method, the
    mean over its finished seeds, shaded +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = os.path.join(plan.out, "plots")
    os.makedirs(out_dir, exist_ok=True)
    per_method = {m: [run_curves(r) for r in plan.runs if r.method == m
                      and state.run(r.key).get("status") == "done"] for m in plan.methods}
    written = []
    for key_fmt, title_fmt, file_fmt in CURVES:
        for split in (plan.splits if "{split}" in key_fmt else [None]):
            key, title = key_fmt.format(split=split), title_fmt.format(split=split)
            fig, ax = plt.subplots(figsize=(7, 4))
            drawn = 0
            for method, runs_rows in per_method.items():
                xs, mean, std = mean_curve(runs_rows, key)
                if not xs:
                    continue
                line, = ax.plot(xs, mean, label=f"{METHODS[method][0]} (n={len(runs_rows)})",
                                marker="." if len(xs) < 30 else None)
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                                [m + s for m, s in zip(mean, std)], color=line.get_color(),
                                alpha=0.15, linewidth=0)
                drawn += 1
            if drawn and "sft_rl" in per_method:
                ax.axvline(split_steps(plan.steps)[0], color="grey", linestyle=":",
                           linewidth=1, label="SFT->RL: SFT | RL")
            if drawn:
                ax.set_title(title + ", mean over seeds")
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                fig.tight_layout()
                written.append(os.path.join(out_dir, file_fmt.format(split=split)))
                fig.savefig(written[-1], dpi=100)
            plt.close(fig)
    return written


def report(plan: Plan, state: State) -> dict:
    """Table, results.json and plots; returns the summary."""
    failed = [{"run": r.key, "error": state.run(r.key).get("error"),
               "log": state.run(r.key).get("log")} for r in plan.runs
              if state.run(r.key).get("status") != "done"]
    methods = aggregate(plan, state)
    table = markdown_table(plan, methods, failed)
    with open(os.path.join(plan.out, "table.md"), "w") as f:
        f.write(table)
    plots = plot_curves(plan, state)
    results = {"settings": {**plan.settings(), "config": plan.config, "overrides": plan.extra,
                            "seeds": plan.seeds, "methods": plan.methods,
                            "splits": plan.splits, "nproc_per_node": plan.nproc,
                            "budget": plan.budget()},
               "methods": methods, "failed": failed,
               "runs": {r.key: state.run(r.key) for r in plan.runs}}
    with open(os.path.join(plan.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(table, flush=True)
    return {"ok": not failed, "out": plan.out, "runs": len(plan.runs),
            "finished": len(plan.runs) - len(failed), "failed": failed,
            "table": os.path.join(plan.out, "table.md"),
            "results": os.path.join(plan.out, "results.json"), "plots": plots,
            "acc": {m: {s: v["mean"] for s, v in d["splits"].items()}
                    for m, d in methods.items()}}
