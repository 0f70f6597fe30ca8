"""The comparison's loop: every run of the plan in turn (train each phase, then the final
evaluation), recording progress in the state so that a re-run picks up where it stopped.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable

from srft_mcore.comparison.bookkeeping import (STATE_FILE, State, final_evaluation, last_row,
                                               phase_action)
from srft_mcore.comparison.jobs import Job, SharedServer, eval_command, launch, train_command
from srft_mcore.comparison.protocol import model_params, run_ledger, select_lrs
from srft_mcore.comparison.run_plan import Plan, Run, add_final_runs


def say(*args) -> None:
    print("[compare]", *args, flush=True)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _fail(state: State, entry: dict, what: str, log: str) -> None:
    entry.update(status="failed", error=what, log=log)
    state.save()


def _call(job_fn: Callable, job: Job, state: State, *entries: dict) -> int:
    """``job_fn(job)``; on Ctrl-C (or SIGTERM) the entries are marked interrupted first."""
    try:
        return job_fn(job)
    except KeyboardInterrupt:
        for e in entries:
            e["status"] = "interrupted"
        state.save()
        raise


def execute_run(plan: Plan, run: Run, state: State, job_fn: Callable, tag: str) -> bool:
    """Train (each phase: skip, resume, restart or start) and evaluate one run; True when
    it has its final accuracies."""
    entry = state.run(run.key)
    entry.pop("error", None)
    relaunched = False
    for ph in run.phases:
        pentry = entry["phases"].setdefault(ph.name, {})
        if relaunched:  # an earlier phase trained again: this one starts from scratch
            pentry.clear()
            shutil.rmtree(ph.run_dir, ignore_errors=True)
        action = phase_action(ph, pentry)
        if action == "skip":
            continue
        relaunched = True
        entry.pop("acc", None)
        if action == "restart":
            shutil.rmtree(ph.run_dir)
        what = f"{ph.algo}, {ph.steps} step{'s' * (ph.steps != 1)}" + (f", from {ph.start_from}" if ph.start_from
                                                  else "")
        say(f"{tag}: {ph.name} ({what}): {action}"
            + (f" from {os.path.basename(_latest(ph.run_dir))}" if action == "resume" else ""))
        log = run.log_path(plan.out, ph.name)
        job = Job("train", run, train_command(plan, ph, action == "resume"), log, ph,
                  resume=action == "resume")
        pentry.update(status="running", log=log, attempts=pentry.get("attempts", 0) + 1)
        entry.update(status="running")
        state.save()
        t0 = time.time()
        rc = _call(job_fn, job, state, pentry, entry)
        pentry["seconds"] = round(pentry.get("seconds", 0.0) + time.time() - t0, 1)
        if rc != 0:
            pentry.update(status="failed", returncode=rc)
            _fail(state, entry, f"{ph.name}: trainer exit status {rc}", log)
            return False
        if last_row(ph.run_dir, ph.steps) is None:
            pentry.update(status="failed", returncode=rc)
            _fail(state, entry, f"{ph.name}: the trainer exited 0 but {ph.run_dir}/"
                                f"metrics.jsonl has no step {ph.steps}", log)
            return False
        pentry.update(status="done", returncode=0)
        state.save()
    if relaunched:  # an evaluation of an earlier policy
        shutil.rmtree(run.eval_dir, ignore_errors=True)
    log = run.log_path(plan.out, "eval")
    if plan.final_eval == "srft-eval" and not os.path.isfile(
            os.path.join(run.eval_dir, "results.json")):
        say(f"{tag}: srft-eval on {', '.join(plan.splits)}")
        entry.update(status="evaluating", eval_log=log)
        state.save()
        rc = _call(job_fn, Job("eval", run, eval_command(plan, run), log), state, entry)
        if rc != 0:
            _fail(state, entry, f"srft-eval exit status {rc}", log)
            return False
    try:
        final = final_evaluation(plan, run)
        entry["acc"] = final.pop("acc")
        entry.update(final)
        entry["ledger"] = run_ledger(run, entry, model_params(plan))
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        _fail(state, entry, f"final evaluation: {e}",
              log if plan.final_eval == "srft-eval" else run.log_path(plan.out,
                                                                      run.phases[-1].name))
        return False
    entry.update(status="done")
    state.save()
    return True


def _latest(run_dir: str) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def execute(plan: Plan, job_fn: Callable = launch) -> State:
    """Every run of the plan in order, reporting progress; failures do not stop the loop.
    With ``--lr-grid``: the selection runs first, then each method's lr is chosen on the
    validation split, then its other seeds at that lr. With ``--shared-server``: one SGLang
    server for every launch (each run syncs its weights into it first)."""
    os.makedirs(plan.out, exist_ok=True)
    state = State(os.path.join(plan.out, STATE_FILE), plan.settings())
    state.save()
    server = SharedServer(plan) if plan.options.get("shared_server") else None
    t_start = time.time()
    try:
        if server is not None and job_fn is launch:
            evaluate_base(plan, state, server)
        _execute_runs(plan, list(plan.runs), state, job_fn, t_start, server)
        if plan.lrs:
            selection = select_lrs(plan, state)
            state.data["selection"] = selection
            state.save()
            for method, sel in selection.items():
                grid = ", ".join(f"{lr}: " + ("-" if acc is None else f"{100 * acc:.1f}%")
                                 for lr, acc in sel["grid"].items())
                say(f"{method}: lr {sel['lr']} chosen on {plan.val_split} ({grid})"
                    if sel["lr"] is not None else f"{method}: no lr run finished ({grid})")
            chosen = {m: sel["lr"] for m, sel in selection.items() if sel["lr"] is not None}
            new = add_final_runs(plan, chosen)
            _execute_runs(plan, new, state, job_fn, t_start, server)
    finally:
        if server is not None:
            server.stop()
    state.data["wall_seconds"] = round(state.data.get("wall_seconds", 0.0)
                                       + time.time() - t_start, 1)
    state.save()
    return state


def evaluate_base(plan: Plan, state: State, server) -> None:
    """``--shared-server``: the base model's row of the table, scored once per seed through
    the shared server while it still holds the base weights (the same decoding as the runs'
    final evaluation, so the base row and the methods' rows compare like for like)."""
    base = state.data.setdefault("base", {})
    for seed in plan.seeds:
        if str(seed) not in base:
            say(f"base model, seed {seed}: scoring {', '.join(plan.splits)}")
            base[str(seed)] = server.evaluate_base(seed)
            state.save()


def _execute_runs(plan: Plan, runs: list, state: State, job_fn: Callable, t_start: float,
                  server) -> None:
    n = len(runs)
    for k, run in enumerate(runs, 1):
        tag = f"{k}/{n} {run.method}" + ("" if run.lr is None else f" lr {run.lr}") \
            + f" seed {run.seed}"
        entry = state.run(run.key)
        if entry.get("status") == "done" and "acc" in entry:
            say(f"{tag}: finished earlier ({_acc_text(entry['acc'])}), skipped "
                f"(elapsed {fmt_seconds(time.time() - t_start)})")
            continue
        say(f"{tag}: start (elapsed {fmt_seconds(time.time() - t_start)})")
        if server is not None:
            plan.server_url = server.lease()
        t0 = time.time()
        ok = execute_run(plan, run, state, job_fn, tag)
        took = fmt_seconds(time.time() - t0)
        total = fmt_seconds(time.time() - t_start)
        if ok:
            say(f"{tag}: done in {took}: {_acc_text(entry['acc'])} (elapsed {total})")
        else:
            say(f"{tag}: FAILED after {took}: {entry['error']}; log: {entry['log']} "
                f"(elapsed {total})")


def _acc_text(acc: dict) -> str:
    return ", ".join(f"{name} {100 * v:.1f}%" for name, v in acc.items())
