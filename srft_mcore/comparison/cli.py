"""``srft-compare``: the paper's comparison of SRFT with its baselines and ablations.

  srft-compare --config FILE --out DIR [--methods M ...] [--seeds K ...] [--steps N]
               [--lr-grid LR LR LR ...] [--val-split NAME] [--shared-server]
               [--sft-rl-warmup N] [--sft-rl-carry-optimizer] [--luffy-demo-slot]
               [--final-eval srft-eval|trainer] [--dry-run] [a.b.c=value ...]
               [--variant NAME=METHOD NAME.a.b.c=value ...]

Methods (arXiv 2506.19767, Table 1 and the ablation): ``sft``, ``grpo``, ``sft_rl`` (SFT for
half the steps, then GRPO from the SFT run's final checkpoint for the other half, its lr
warmed up again), ``luffy``, ``srft``, ``srft_no_wsft``, ``srft_no_wrl`` (and, on request, ``srft_adv``: SRFT
with its on-policy term in the advantage form); each for every seed,
all with the same base model, steps, prompts per step and rollouts per prompt (SFT->RL spends
the same total budget over its two runs). A seed sets ``train.seed`` (rollout and evaluation
sampling; with the embedded task also the drawing of its training set) and the prompt order
(``data.shuffle_seed``, derived from the config's and the seed): for one seed every method
sees the same prompts in the same order, so results are paired by seed.

Splits: the config's ``eval.splits``, else the embedded task's ``val``, ``id`` and ``ood``.
The validation split (``--val-split``, default ``val``) is drawn from the training
distribution and disjoint from the training data and the held-out splits; settings are
chosen on it and results are reported on the others.

The protocol (``--lr-grid``): first every method runs at every lr of the grid with the first
seed; each method's lr is the one with the best validation accuracy (a tie: the smaller lr);
the held-out splits are never read for this. Then the other seeds run at the chosen lr. A
method's result is its runs at its chosen lr (the selection run is its first seed's).

Each training run is one trainer launch (``srft-train --nproc-per-node N --config FILE
...``, torchrun after its checks) into ``DIR/runs/METHOD/[lrLR/]seedK`` (SFT->RL: its ``sft``
and ``rl`` subdirectories). With ``--shared-server`` every launch attaches to one SGLang
server that the driver starts once (each run first syncs its weights into it); else each
launch starts its own. Then the final policy is scored on every split:

- ``--final-eval srft-eval`` (default): one ``srft-eval`` pass per run on the exported
  policy with the same decoding for every method (``eval.temperature``, ``eval.n_samples``,
  ``eval.max_new_tokens`` or ``data.max_response_len``, sampling seed = the run's seed) on
  the whole splits (``--eval-limit N``: the first N problems), into ``RUN/final_eval``;
- ``--final-eval trainer``: the trainer's own last evaluation (``eval/SPLIT/acc`` at the final
  step of ``metrics.jsonl``; needs ``eval.every > 0``), no extra server start.
Both score strictly: a response cut off at the length limit, or without a final answer,
scores 0; each reports the truncation rate too.

Bookkeeping (``DIR/state.json``): re-running the same command skips finished runs, resumes
an interrupted run with ``--resume`` when it has a checkpoint and restarts one that has none.
A failed run is reported with its log (``DIR/logs``) and the others go on; the exit status is
then 1. ``DIR`` keeps the settings it was started with: another ``--steps``, grid, config or
overrides need another ``--out``.

Output (stdout and ``DIR/table.md``): per method its lr, the accuracy per split as mean
± 95 % t-interval over seeds, the held-out truncation rate; SRFT minus each method, paired
by seed, with its interval; the compute ledger per run (prompts, demonstration tokens
trained, rollout tokens generated, tokens trained, FLOPs = 6N per trained + 2N per generated
token, wall time); the lr grid's validation accuracies. ``DIR/results.json`` holds all of it
and one record per run; plots in ``DIR/plots`` (accuracy per split, entropy and truncation
over the steps, one line per method, mean over seeds, a band of ± one std); one JSON summary
as the last line.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import sys
from typing import Callable, Optional

from srft_mcore.comparison.bookkeeping import STATE_FILE, phase_action
from srft_mcore.comparison.execution import execute, say
from srft_mcore.comparison.jobs import eval_command, launch, train_command
from srft_mcore.comparison.results import report
from srft_mcore.comparison.run_plan import (DEFAULT_METHODS, FINAL_EVALS, METHODS, MIN_GRID,
                                            CompareError,
                                            Plan, build_plan, check_configs)
from srft_mcore.config import ConfigError


def dry_run(plan: Plan) -> dict:
    """Print the commands the next real invocation would run (reads the state, if any)."""
    path = os.path.join(plan.out, STATE_FILE)
    runs = {}
    if os.path.isfile(path):
        with open(path) as f:
            runs = json.load(f).get("runs", {})
    count = 0
    if plan.options.get("shared_server") == "launch":
        print("# --shared-server: the driver starts one SGLang server; every launch below also "
              "gets rollout.urls=[its URL] rollout.weight_sync=disk", flush=True)
    for k, run in enumerate(plan.runs, 1):
        entry = runs.get(run.key, {})
        print(f"# {k}/{len(plan.runs)} {run.key} ({run.label})", flush=True)
        if entry.get("status") == "done" and "acc" in entry:
            print("#   finished: skipped", flush=True)
            continue
        relaunched = False
        for ph in run.phases:
            action = "fresh" if relaunched else phase_action(
                ph, entry.get("phases", {}).get(ph.name, {}))
            if action == "skip":
                continue
            relaunched = True
            if action == "restart":
                print(f"rm -rf {shlex.quote(ph.run_dir)}")
            print(shlex.join(train_command(plan, ph, action == "resume")), flush=True)
            count += 1
        if plan.final_eval == "srft-eval":
            print(shlex.join(eval_command(plan, run)), flush=True)
            count += 1
    if plan.lrs:
        print(f"# then, per method, seeds {', '.join(map(str, plan.seeds[1:])) or '(none)'} at "
              f"the lr chosen on {plan.val_split}", flush=True)
    return {"dry_run": True, "out": plan.out, "runs": len(plan.runs), "commands": count}


def _split_words(values: Optional[list], overrides: list, kind=str) -> Optional[list]:
    """--methods / --seeds words: comma lists allowed; ``a.b=c`` words (swallowed by the
    option's nargs) go back to the overrides."""
    if values is None:
        return None
    out = []
    for word in values:
        if "=" in word:
            overrides.append(word)
            continue
        out += [kind(w) for w in word.split(",") if w]
    return out


def _register_variants(args) -> None:
    """--variant NAME=METHOD: take the NAME.a.b=c overrides out of the shared ones and
    register the method (run_plan.add_variant)."""
    from srft_mcore.comparison.run_plan import add_variant

    names = []
    for text in args.variant:
        name, sep, method = text.partition("=")
        if not sep:
            raise CompareError(f"--variant {text}: expected NAME=METHOD. Fix: e.g. "
                               f"--variant srft_ema=srft srft_ema.algorithm.weight_schedule=ema")
        names.append((name.strip(), method.strip()))
    own = {name: [] for name, _ in names}
    shared = []
    for word in args.overrides:
        head, dot, rest = word.partition(".")
        (own[head] if dot and head in own else shared).append(rest if head in own else word)
    args.overrides = shared
    for name, method in names:
        if not own[name]:
            raise CompareError(f"--variant {name}={method}: no {name}.a.b=c overrides, so it "
                               f"would repeat {method}. Fix: add e.g. {name}.algorithm.X=Y")
        add_variant(name, method, own[name])
    if args.methods is None and names:
        args.methods = [*DEFAULT_METHODS, *(name for name, _ in names)]
    missing = [name for name, _ in names if name not in (args.methods or [])]
    if missing:
        raise CompareError(f"--variant {', '.join(missing)}: declared but not in --methods. "
                           f"Fix: add {' '.join(missing)} to --methods")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srft-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="the trainer's YAML config (every run's "
                                                   "base, e.g. examples/configs/FILE.yaml)")
    p.add_argument("--out", required=True, help="comparison directory (re-use it to resume)")
    p.add_argument("--methods", nargs="+", metavar="M",
                   help=f"methods (default the paper's seven, {', '.join(DEFAULT_METHODS)}; "
                        f"also: {', '.join(m for m in METHODS if m not in DEFAULT_METHODS)})")
    p.add_argument("--seeds", nargs="+", metavar="K", help="seeds (default 1 2 3)")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default: the "
                                             "config's train.steps)")
    p.add_argument("--final-eval", choices=FINAL_EVALS, default="srft-eval",
                   help="score the final policies with an srft-eval pass (default) or take "
                        "the trainer's last evaluation")
    p.add_argument("--eval-limit", type=int, help="srft-eval: first N problems of each split "
                                                  "(default: all)")
    p.add_argument("--nproc-per-node", type=int, help="trainer ranks (default: tp*pp*cp*dp "
                                                      "of the config, dp unset = 1)")
    p.add_argument("--python", help="interpreter for the launches (default: this one)")
    p.add_argument("--lr-grid", nargs="+", metavar="LR",
                   help=f"choose each method's lr among these (at least {MIN_GRID}) on the "
                        f"validation split, with the first seed; the other seeds then run at "
                        f"the chosen lr (default: the config's lr for every method)")
    p.add_argument("--val-split", metavar="NAME",
                   help="the validation split, one of eval.splits (default: 'val'; the "
                        "embedded task ships one)")
    p.add_argument("--sft-rl-warmup", type=int, metavar="N",
                   help="SFT->RL: linear lr warm-up steps of its RL run (default: a tenth of "
                        "its steps, at least 1)")
    p.add_argument("--sft-rl-carry-optimizer", action="store_true",
                   help="SFT->RL: its RL run takes the SFT run's optimizer state (Adam "
                        "moments) instead of a fresh one")
    p.add_argument("--luffy-demo-slot", action="store_true",
                   help="LUFFY: the demonstration takes one rollout's place in its group "
                        "(LUFFY's 7 + 1 of 8), rollout.n_samples - 1 rollouts")
    p.add_argument("--shared-server", nargs="?", const="launch", metavar="URL",
                   help="one SGLang server for every launch (each run syncs its weights into "
                        "it first) instead of one per launch: started by the driver, or the "
                        "running server at URL")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD",
                   help="a method of your own: METHOD (a built-in one) with the overrides "
                        "given as NAME.a.b=c words, e.g. --variant srft_ema=srft "
                        "srft_ema.algorithm.weight_schedule=ema; list it in --methods "
                        "(without --methods: the defaults and every variant)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides for every run")
    return p


def parse_args(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    args.overrides = list(args.overrides)
    args.methods = _split_words(args.methods, args.overrides)
    try:
        args.seeds = _split_words(args.seeds, args.overrides, int)
    except ValueError:
        raise CompareError(f"--seeds {args.seeds}: seeds are integers. Fix: e.g. --seeds 1 2 3")
    try:
        args.lr_grid = _split_words(args.lr_grid, args.overrides, float)
    except ValueError:
        raise CompareError(f"--lr-grid {args.lr_grid}: learning rates are numbers. Fix: e.g. "
                           f"--lr-grid 1e-3 2e-3 4e-3") from None
    if (args.shared_server and "=" in args.shared_server
            and not args.shared_server.startswith(("http://", "https://"))):
        args.overrides.insert(0, args.shared_server)  # an a.b=c word, not a URL
        args.shared_server = "launch"
    _register_variants(args)
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        raise CompareError(f"--methods: unknown {unknown}. Fix: choose from "
                           f"{', '.join(METHODS)}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise CompareError(f"--eval-limit {args.eval_limit}: must be >= 1. Fix: drop it")
    return args


class _DriverLock:
    """One driver per comparison directory (``out/compare.lock``)."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.fd = os.open(os.path.join(out, "compare.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise CompareError(f"another srft-compare works in {out}. Fix: wait for it, or "
                               f"use another --out") from None

    def release(self) -> None:
        os.close(self.fd)


def _refused(e: Exception) -> int:
    print(f"srft-compare: {e}", file=sys.stderr, flush=True)
    print(json.dumps({"ok": False, "error": str(e).splitlines()[0]}), flush=True)
    return 2


def _stop(signum, frame):
    """SIGTERM as Ctrl-C: the running launch is ended and the state kept for a re-run."""
    raise KeyboardInterrupt


def main(argv=None, job_fn: Callable = launch) -> int:
    try:
        args = parse_args(argv)
        plan = build_plan(args)
        if args.dry_run:
            print(json.dumps(dry_run(plan), sort_keys=True), flush=True)
            return 0
        check_configs(plan)
        lock = _DriverLock(plan.out)
    except (CompareError, ConfigError) as e:
        return _refused(e)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if plan.lrs:
            say(f"{len(plan.runs)} selection runs ({', '.join(plan.methods)} x lr "
                f"{', '.join(map(str, plan.lrs))}, seed {plan.seeds[0]}), then "
                f"{len(plan.methods) * (len(plan.seeds) - 1)} runs at the chosen lrs (seeds "
                f"{', '.join(map(str, plan.seeds[1:])) or 'none'}), {plan.steps} steps each, "
                f"into {plan.out}")
        else:
            say(f"{len(plan.runs)} runs ({', '.join(plan.methods)} x seeds "
                f"{', '.join(map(str, plan.seeds))}), {plan.steps} steps each, into {plan.out}")
        state = execute(plan, job_fn)
        summary = report(plan, state)
    except CompareError as e:
        return _refused(e)
    except KeyboardInterrupt:
        print(f"srft-compare: interrupted; run the same command again to resume "
              f"({plan.out}/{STATE_FILE})", file=sys.stderr, flush=True)
        print(json.dumps({"ok": False, "interrupted": True, "out": plan.out}), flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
