"""A comparison's results: per method and split the mean with its 95 % interval over seeds,
the paired differences to SRFT, the compute ledger, the lr grid, ``results.json`` (one record
per run) and the curves (accuracy, entropy, truncation) averaged over seeds.
"""
from __future__ import annotations

import json
import math
import os

from typing import Optional

from srft_mcore.comparison.bookkeeping import State
from srft_mcore.comparison.protocol import (LEDGER_KEYS, mean_ci, model_params,
                                            paired_difference)
from srft_mcore.comparison.run_plan import METHODS, Plan, Run, split_steps

CURVES = (("eval/{split}/acc", "accuracy ({split})", "eval_{split}_acc.png"),
          ("entropy/step", "policy entropy H (rollout tokens)", "entropy.png"),
          ("len/clipped_frac", "rollouts cut off at the length limit", "truncated.png"))


def mean_std(values: list) -> dict:
    """n, mean and the sample standard deviation (n - 1; None below two values)."""
    stats = mean_ci(values)
    return {"n": stats["n"], "mean": stats["mean"], "std": stats["std"]}


def chosen_lr(plan: Plan, state: State, method: str) -> Optional[float]:
    """The lr the validation split chose for ``method`` (None: no grid, or no choice)."""
    return (state.data.get("selection", {}).get(method) or {}).get("lr")


def method_runs(plan: Plan, state: State, method: str) -> list:
    """The runs a method's result is made of: every seed at its chosen lr (all its runs
    without a grid)."""
    if not plan.lrs:
        return plan.method_runs(method)
    lr = chosen_lr(plan, state, method)
    return plan.method_runs(method, lr) if lr is not None else []


def _done(state: State, run: Run) -> Optional[dict]:
    entry = state.run(run.key)
    return entry if entry.get("status") == "done" and entry.get("acc") else None


def aggregate(plan: Plan, state: State) -> dict:
    """Per method: its label, chosen lr, seeds, per split the mean with its 95 % interval
    over the finished seeds (and every seed's value), the truncation rate, the mean ledger,
    and (every method but SRFT) the paired difference SRFT minus it per held-out split."""
    out = {}
    for method in plan.methods:
        runs = method_runs(plan, state, method)
        done = {r.seed: _done(state, r) for r in runs if _done(state, r)}
        splits, trunc = {}, {}
        for name in plan.splits:
            values = {str(s): e["acc"][name] for s, e in done.items()}
            splits[name] = {**mean_ci(list(values.values())), "values": values}
            rates = [e["truncation_rate"][name] for e in done.values()
                     if name in e.get("truncation_rate", {})]
            trunc[name] = sum(rates) / len(rates) if rates else None
        ledgers = [e["ledger"] for e in done.values() if e.get("ledger")]
        ledger = {k: (sum(lg[k] for lg in ledgers) / len(ledgers)
                      if ledgers and all(lg.get(k) is not None for lg in ledgers) else None)
                  for k in (*LEDGER_KEYS, "flops", "seconds")}
        out[method] = {"label": METHODS[method][0], "lr": chosen_lr(plan, state, method),
                       "seeds": [r.seed for r in runs] or list(plan.seeds),
                       "finished": sorted(done), "splits": splits,
                       "truncation_rate": trunc, "ledger": ledger}
    base = state.data.get("base") or {}
    if base:  # --shared-server: the start policy, scored with the runs' decoding
        out = {"base": {"label": "base model", "lr": None, "base": True,
                        "seeds": sorted(map(int, base)),
                        "finished": sorted(map(int, base)),
                        "splits": {name: {**mean_ci([b["acc"][name] for b in base.values()]),
                                          "values": {s: b["acc"][name]
                                                     for s, b in base.items()}}
                                   for name in plan.splits},
                        "truncation_rate": {name: _mean([b["truncation_rate"].get(name)
                                                         for b in base.values()])
                                            for name in plan.splits},
                        "ledger": dict.fromkeys((*LEDGER_KEYS, "flops", "seconds"))}, **out}
    if "srft" in out:
        ref = out["srft"]["splits"]
        for method, m in out.items():
            if method != "srft":
                m["srft_minus"] = {name: paired_difference(ref[name]["values"],
                                                           m["splits"][name]["values"])
                                   for name in plan.held_out}
    return out


def _mean(values: list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def records(plan: Plan, state: State) -> list:
    """One record per run of the comparison (the lr grid's included): method, seed, lr,
    whether the lr is the method's choice, accuracy / truncation rate / mean length per
    split, and its ledger."""
    out = []
    for run in plan.runs:
        entry = state.run(run.key)
        lr = run.lr if run.lr is not None else plan.base.optimizer.lr
        out.append({"method": run.method, "seed": run.seed, "lr": lr,
                    "chosen": run.lr is None or run.lr == chosen_lr(plan, state, run.method),
                    "status": entry.get("status"), "acc": entry.get("acc"),
                    "truncation_rate": entry.get("truncation_rate"),
                    "mean_tokens": entry.get("mean_tokens"), "ledger": entry.get("ledger")})
    return out


def pct(stats: dict) -> str:
    """A split's cell: mean (%) with the 95 % interval's half-width, else the std."""
    if not stats["n"]:
        return "-"
    text = f"{100 * stats['mean']:.1f}"
    spread = stats["ci95"] if "ci95" in stats else stats.get("std")
    return text + (f" ± {100 * spread:.1f}" if spread is not None else "")


def _signed(stats: dict) -> str:
    if not stats["n"]:
        return "-"
    text = f"{100 * stats['mean']:+.1f}"
    return text + (f" ± {100 * stats['ci95']:.1f}" if stats["ci95"] is not None else "")


def _human(x, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def markdown_table(plan: Plan, methods: dict, failed: list) -> str:
    b = plan.budget()
    e = plan.base.eval
    if plan.final_eval == "srft-eval":
        limit = f", first {plan.eval_limit} problems" if plan.eval_limit else ""
        how = (f"srft-eval on the final policy (temperature {e.temperature}, "
               f"{e.n_samples} sample(s) per problem{limit}, sampling seed = run seed)")
    else:
        how = "the trainer's evaluation at the final step"
    luffy = (f"; LUFFY {b['luffy_rollouts_per_prompt']} rollouts + the demonstration"
             if b["luffy_rollouts_per_prompt"] != b["rollouts_per_prompt"] else "")
    chosen = (f"each method's lr chosen on `{plan.val_split}` from {plan.lrs} (seed "
              f"{plan.seeds[0]})" if plan.lrs else f"lr {plan.base.optimizer.lr} for every method")
    lines = [f"Final accuracy (%), mean ± 95 % t-interval over seeds; {how}; {chosen}. Every "
             f"method: {b['steps']} steps x {b['prompts_per_step']} prompts x "
             f"{b['rollouts_per_prompt']} rollouts{luffy} (SFT->RL: {b['sft_rl_steps'][0]} SFT "
             f"+ {b['sft_rl_steps'][1]} GRPO steps, lr warm-up "
             f"{plan.options.get('sft_rl_warmup')} steps"
             f"{', optimizer state carried' if plan.options.get('sft_rl_carry_optimizer') else ''}"
             f").", ""]
    names = list(plan.splits)
    head = [f"{n} (validation)" if n == plan.val_split else n for n in names]
    lines += ["| method | lr | " + " | ".join(head) + " | truncated | seeds |",
              "|---|---|" + "---|" * len(names) + "---|---|"]
    for m in methods.values():
        cells = [pct(m["splits"][s]) for s in names]
        rates = [m["truncation_rate"][s] for s in plan.held_out
                 if m["truncation_rate"].get(s) is not None]
        trunc = f"{100 * sum(rates) / len(rates):.1f}" if rates else "-"
        lr = m["lr"] if m["lr"] is not None else (
            "-" if plan.lrs or m.get("base") else plan.base.optimizer.lr)
        lines.append(f"| {m['label']} | {lr} | " + " | ".join(cells)
                     + f" | {trunc} | {len(m['finished'])}/{len(m['seeds'])} |")
    if any("srft_minus" in m for m in methods.values()):
        lines += ["", "SRFT minus each method (points), paired by seed, mean ± 95 % t-interval:",
                  "", "| method | " + " | ".join(plan.held_out) + " |",
                  "|---|" + "---|" * len(plan.held_out)]
        for m in methods.values():
            if "srft_minus" in m:
                lines.append(f"| {m['label']} | " + " | ".join(
                    _signed(m["srft_minus"][s]) for s in plan.held_out) + " |")
    lines += ["", "Compute per run (mean over seeds; FLOPs = 6N x trained + 2N x generated "
              "tokens):", "",
              "| method | prompts | demo tokens trained | rollout tokens generated | tokens "
              "trained | FLOPs | wall |", "|---|---|---|---|---|---|---|"]
    for m in methods.values():
        lg = m["ledger"]
        lines.append(f"| {m['label']} | {_human(lg['prompts'])} | {_human(lg['demo_tokens'])} | "
                     f"{_human(lg['rollout_tokens'])} | {_human(lg['trained_tokens'])} | "
                     f"{_human(lg['flops'])} | "
                     + ("-" if lg["seconds"] is None else f"{lg['seconds']:.0f} s") + " |")
    if failed:
        lines += ["", "Failed runs:"] + [f"- {f['run']}: {f['error']} (log: {f['log']})"
                                         for f in failed]
    return "\n".join(lines) + "\n"


def grid_table(plan: Plan, state: State) -> str:
    """The lr grid: validation accuracy of each method at each lr (first seed)."""
    sel = state.data.get("selection", {})
    if not plan.lrs or not sel:
        return ""
    lines = [f"Learning-rate choice: `{plan.val_split}` accuracy (%) at seed {plan.seeds[0]}; "
             f"the chosen lr in bold.", "",
             "| method | " + " | ".join(map(str, plan.lrs)) + " |",
             "|---|" + "---|" * len(plan.lrs)]
    for method in plan.methods:
        s = sel.get(method, {})
        cells = []
        for lr in plan.lrs:
            acc = s.get("grid", {}).get(str(lr))
            cell = "-" if acc is None else f"{100 * acc:.1f}"
            cells.append(f"**{cell}**" if lr == s.get("lr") else cell)
        lines.append(f"| {METHODS[method][0]} | " + " | ".join(cells) + " |")
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
    per_method = {m: [run_curves(r) for r in method_runs(plan, state, m)
                      if state.run(r.key).get("status") == "done"] for m in plan.methods}
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
    """Tables, results.json (with one record per run) and plots; returns the summary."""
    failed = [{"run": r.key, "error": state.run(r.key).get("error"),
               "log": state.run(r.key).get("log")} for r in plan.runs
              if state.run(r.key).get("status") != "done"]
    methods = aggregate(plan, state)
    table = markdown_table(plan, methods, failed) + (
        "\n" + grid_table(plan, state) if plan.lrs else "")
    with open(os.path.join(plan.out, "table.md"), "w") as f:
        f.write(table)
    plots = plot_curves(plan, state)
    results = {"settings": {**plan.settings(), "config": plan.config, "overrides": plan.extra,
                            "seeds": plan.seeds, "methods": plan.methods,
                            "splits": plan.splits, "validation_split": plan.val_split,
                            "held_out": plan.held_out, "nproc_per_node": plan.nproc,
                            "budget": plan.budget(), "params": model_params(plan)},
               "selection": state.data.get("selection"),
               "wall_seconds": state.data.get("wall_seconds"),
               "methods": methods, "failed": failed, "records": records(plan, state),
               "runs": {r.key: state.run(r.key) for r in plan.runs}}
    with open(os.path.join(plan.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(table, flush=True)
    return {"ok": not failed, "out": plan.out, "runs": len(plan.runs),
            "finished": len(plan.runs) - len(failed), "failed": failed,
            "table": os.path.join(plan.out, "table.md"),
            "results": os.path.join(plan.out, "results.json"), "plots": plots,
            "lr": {m: d["lr"] for m, d in methods.items()} if plan.lrs else None,
            "acc": {m: {s: v["mean"] for s, v in d["splits"].items()}
                    for m, d in methods.items()}}
