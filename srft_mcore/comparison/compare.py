"""``srft-compare``: the paper's comparison of SRFT with its baselines and ablations.

  srft-compare --config FILE --out DIR [--methods M ...] [--seeds K ...] [--steps N]
               [--final-eval srft-eval|trainer] [--dry-run] [a.b.c=value ...]

Methods (arXiv 2506.19767, Table 1 and the ablation): ``sft``, ``grpo``, ``sft_rl`` (SFT for
half the steps, then GRPO from the SFT run's final checkpoint for the other half),
``luffy``, ``srft``, ``srft_no_wsft``, ``srft_no_wrl``; each for every seed, all with the same
base model, steps, prompts per step and rollouts per prompt (SFT->RL spends the same total
budget over its two runs). A seed sets ``train.seed`` (rollout and evaluation sampling; with
the embedded task also the drawing of its training set) and the prompt order
(``data.shuffle_seed``, derived from the config's and the seed): for one seed every method
sees the same prompts in the same order. The held-out splits are the config's
``eval.splits``, else the embedded task's shipped ``id`` and ``ood`` splits, the same
problems for every method and seed.

Each training run is one trainer launch (``torchrun --standalone --nproc_per_node=N -m
srft_mcore.training.trainer --config FILE ...``) into ``DIR/runs/METHOD/seedK`` (SFT->RL: its ``sft``
and ``rl`` subdirectories). Then the final policy is scored on every held-out split:

- ``--final-eval srft-eval`` (default): one ``srft-eval`` pass per run on the exported
  policy with the same decoding for every method (``eval.temperature``, ``eval.n_samples``,
  ``eval.max_new_tokens`` or ``data.max_response_len``, sampling seed = the run's seed) on
  the whole splits (``--eval-limit N``: the first N problems), into ``RUN/final_eval``;
- ``--final-eval trainer``: the trainer's own last evaluation (``eval/SPLIT/acc`` at the final
  step of ``metrics.jsonl``; needs ``eval.every > 0``), no extra server start.

Bookkeeping (``DIR/state.json``): re-running the same command skips finished runs, resumes
an interrupted run with ``--resume`` when it has a checkpoint and restarts one that has none.
A failed run is reported with its log (``DIR/logs``) and the others go on; the exit status is
then 1. ``DIR`` keeps the settings it was started with: another ``--steps``, config or
overrides need another ``--out``.

Output: a Markdown table of the final accuracies, mean +- sample std over seeds, per method
and split (stdout and ``DIR/table.md``), ``DIR/results.json`` (every seed's value), plots in
``DIR/plots`` (held-out accuracy per split and the policy entropy over the steps, one line per
method, mean over seeds, a band of +- one std), and one JSON summary as the last line.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from srft_mcore.config import ConfigError, load_config, parse_override, validate

METHODS = {  # CLI name -> (label, the algorithm.name of each trainer launch)
    "sft": ("SFT", ("sft",)),
    "grpo": ("GRPO", ("grpo",)),
    "sft_rl": ("SFT->RL", ("sft", "grpo")),
    "luffy": ("LUFFY", ("luffy",)),
    "srft": ("SRFT", ("srft",)),
    "srft_no_wsft": ("SRFT w/o w_SFT", ("srft_no_wsft",)),
    "srft_no_wrl": ("SRFT w/o w_RL", ("srft_no_wrl",)),
}
PHASE_NAMES = {1: ("train",), 2: ("sft", "rl")}
"""Subdirectory of each trainer launch of a method (one launch: the run directory itself)."""
DEFAULT_SEEDS = (1, 2, 3)
OWNED_KEYS = ("algorithm.name", "train.steps", "train.seed", "data.shuffle_seed",
              "logging.run_dir", "checkpoint.dir", "checkpoint.resume", "model.load_mcore")
"""Set per run by the driver; an override of one of them is refused."""
FINAL_EVALS = ("srft-eval", "trainer")
STATE_FILE = "state.json"
CURVES = (("eval/{split}/acc", "held-out accuracy ({split})", "eval_{split}_acc.png"),
          ("entropy/step", "policy entropy H (rollout tokens)", "entropy.png"))


class CompareError(ValueError):
    """Bad input to the comparison; the message ends with the fix."""


def say(*args) -> None:
    print("[compare]", *args, flush=True)


# --------------------------------------------------------------------------- the plan
@dataclass
class Phase:
    """One trainer launch."""

    name: str
    """train (a one-launch method) | sft | rl (the two runs of SFT->RL)."""
    algo: str
    steps: int
    run_dir: str
    overrides: list
    """Everything after ``--config FILE`` (without ``--resume``)."""
    start_from: Optional[str] = None
    """The checkpoint it starts from (``model.load_mcore``), for the RL run of SFT->RL."""


@dataclass
class Run:
    """One method and seed: its trainer launches and the final evaluation."""

    method: str
    seed: int
    dir: str
    phases: list
    eval_dir: str

    @property
    def key(self) -> str:
        return f"{self.method}/seed{self.seed}"

    @property
    def label(self) -> str:
        return METHODS[self.method][0]

    @property
    def final_dir(self) -> str:
        """The run directory holding the final policy."""
        return self.phases[-1].run_dir

    def log_path(self, out: str, part: str) -> str:
        return os.path.join(out, "logs", f"{self.method}_seed{self.seed}_{part}.log")


@dataclass
class Plan:
    config: str
    out: str
    steps: int
    methods: list
    seeds: list
    extra: list
    """The user's overrides, applied to every launch."""
    final_eval: str
    eval_limit: Optional[int]
    nproc: int
    python: str
    splits: dict
    """name -> held-out file (srft-eval and the trainer's evaluation)."""
    base: object
    """The config with the user's overrides (the values every run shares)."""
    runs: list = field(default_factory=list)

    def settings(self) -> dict:
        """What a re-run must repeat to reuse the finished runs in ``out``: the config every
        run shares (file + overrides, as values), the steps and the final evaluation."""
        resolved = json.dumps(self.base.to_dict(), sort_keys=True, default=str)
        return {"config_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
                "steps": self.steps, "final_eval": self.final_eval,
                "eval_limit": self.eval_limit}

    def budget(self) -> dict:
        t, r = self.base.train, self.base.rollout
        return {"steps": self.steps, "prompts_per_step": t.prompts_per_step,
                "rollouts_per_prompt": r.n_samples,
                "rollouts_per_run": self.steps * t.prompts_per_step * r.n_samples,
                "sft_rl_steps": list(split_steps(self.steps))}


def split_steps(steps: int) -> tuple:
    """SFT->RL: the SFT run's and the RL run's steps; together the other methods' budget."""
    return steps // 2, steps - steps // 2


def shuffle_seed(base: int, seed: int, phase: int = 0) -> int:
    """The prompt-order seed of a run: far from the other seeds' (the sampler seeds each
    epoch with shuffle_seed + epoch, so neighbouring integers would share orders)."""
    digest = hashlib.sha256(f"srft-compare:{base}:{seed}:{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2 ** 31


def build_plan(args) -> Plan:
    """Check the input and lay out every run; reads files, writes nothing."""
    config = os.path.abspath(args.config)
    extra = list(args.overrides)
    for text in extra:
        key, _ = parse_override(text)
        if key in OWNED_KEYS:
            raise CompareError(f"override {text!r}: srft-compare sets {key} for each run. Fix: "
                               f"drop it (steps: --steps; seeds: --seeds; run directories: "
                               f"--out)")
    base = load_config(config, extra)
    steps = args.steps if args.steps is not None else base.train.steps
    methods = args.methods or list(METHODS)
    seeds = args.seeds or list(DEFAULT_SEEDS)
    for name, values in (("--methods", methods), ("--seeds", seeds)):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise CompareError(f"{name}: {dup} given twice. Fix: name each once")
    if steps < 1 or ("sft_rl" in methods and steps < 2):
        raise CompareError(f"--steps {steps}: need at least {2 if 'sft_rl' in methods else 1} "
                           f"(SFT->RL splits them into an SFT and an RL run). Fix: more steps")
    if args.final_eval == "trainer" and not base.eval.every:
        raise CompareError("--final-eval trainer needs the trainer's evaluation, but eval.every "
                           "is 0. Fix: set eval.every=K (it also evaluates the last step), or "
                           "use --final-eval srft-eval")
    out = os.path.abspath(args.out)
    splits = dict(base.eval.splits or {})
    if not splits and base.data.path is None:  # the embedded task's, as the trainer's
        from srft_mcore.data.embedded import embedded_eval_splits

        splits = embedded_eval_splits()
    if not splits:
        raise CompareError("no held-out splits to score the final policies on: the config "
                           "trains on data.path and has no eval.splits. Fix: add "
                           "eval.splits={name: FILE, ...} (srft-eval layouts)")
    splits = {name: os.path.abspath(path) for name, path in splits.items()}
    p = base.parallel
    nproc = args.nproc_per_node or p.tp * p.pp * p.cp * (p.dp or 1)
    plan = Plan(config=config, out=out, steps=steps, methods=methods, seeds=seeds, extra=extra,
                final_eval=args.final_eval, eval_limit=args.eval_limit, nproc=nproc,
                python=args.python or sys.executable, splits=splits, base=base)
    shared = ["logging.progress_bar=false", *extra]
    for seed in seeds:  # seed-major: a partial comparison has every method's first seeds
        for method in methods:
            algos = METHODS[method][1]
            phase_steps = split_steps(steps) if len(algos) == 2 else (steps,)
            run_dir = os.path.join(out, "runs", method, f"seed{seed}")
            phases = []
            for i, (name, algo, n) in enumerate(zip(PHASE_NAMES[len(algos)], algos,
                                                    phase_steps)):
                pdir = run_dir if len(algos) == 1 else os.path.join(run_dir, name)
                start = (os.path.join(phases[-1].run_dir, "checkpoints",
                                      f"step_{phases[-1].steps:06d}") if phases else None)
                own = [f"algorithm.name={algo}", f"train.steps={n}", f"train.seed={seed}",
                       f"data.shuffle_seed={shuffle_seed(base.data.shuffle_seed, seed, i)}",
                       f"logging.run_dir={pdir}"]
                if start is not None:
                    own.append(f"model.load_mcore={start}")
                phases.append(Phase(name, algo, n, pdir, shared + own, start))
            plan.runs.append(Run(method, seed, run_dir, phases,
                                 os.path.join(run_dir, "final_eval")))
    return plan


def check_configs(plan: Plan) -> None:
    """Every launch's config passes the trainer's checks before anything starts."""
    for run in plan.runs:
        for ph in run.phases:
            try:
                validate(load_config(plan.config, ph.overrides), world_size=plan.nproc)
            except ConfigError as e:
                raise CompareError(f"{run.key} ({ph.name}): {e}") from None


# --------------------------------------------------------------------------- launching
@dataclass
class Job:
    """One process the driver starts: a trainer launch or an srft-eval pass."""

    kind: str
    """train | eval"""
    run: Run
    cmd: list
    log: str
    phase: Optional[Phase] = None
    resume: bool = False


def train_command(plan: Plan, phase: Phase, resume: bool) -> list:
    return [plan.python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={plan.nproc}", "-m", "srft_mcore.training.trainer",
            "--config", plan.config, *phase.overrides] + (["--resume"] if resume else [])


def eval_command(plan: Plan, run: Run) -> list:
    e, d = plan.base.eval, plan.base.data
    cmd = [plan.python, "-m", "srft_mcore.evaluation.evaluate", "--model", run.final_dir]
    for name, path in plan.splits.items():
        cmd += ["--data", f"{name}={path}"]
    cmd += ["--seed", str(run.seed), "--temperature", str(e.temperature),
            "--n-samples", str(e.n_samples),
            "--max-new-tokens", str(e.max_new_tokens or d.max_response_len),
            "--out", run.eval_dir, "--overwrite"]
    if plan.eval_limit is not None:
        cmd += ["--limit", str(plan.eval_limit)]
    return cmd


def launch(job: Job) -> int:
    """Run ``job.cmd`` with its output appended to ``job.log``; the exit status. The one
    place the driver starts processes (tests replace it)."""
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(job.cmd)}\n")
        log.flush()
        return subprocess.run(job.cmd, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode


# --------------------------------------------------------------------------- state
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
            self.data["runs"] = old.get("runs", {})

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


def final_accuracies(plan: Plan, run: Run) -> dict:
    """split -> accuracy of the run's final policy; raises RuntimeError when missing."""
    if plan.final_eval == "srft-eval":
        path = os.path.join(run.eval_dir, "results.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"srft-eval wrote no {path}")
        with open(path) as f:
            results = json.load(f)["results"]
        return {name: float(results[name]["acc"]) for name in plan.splits}
    last = run.phases[-1]
    row = last_row(last.run_dir, last.steps) or {}
    missing = [s for s in plan.splits if f"eval/{s}/acc" not in row]
    if missing:
        raise RuntimeError(f"{last.run_dir}/metrics.jsonl has no eval/<split>/acc for "
                           f"{missing} at the final step {last.steps}")
    return {s: float(row[f"eval/{s}/acc"]) for s in plan.splits}


# --------------------------------------------------------------------------- the loop
def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def phase_action(ph: Phase, entry: dict) -> str:
    """What a phase needs now: skip (finished) | resume | restart (earlier attempt without a
    checkpoint: its directory is cleared) | fresh."""
    if entry.get("status") == "done":
        return "skip"
    if has_checkpoint(ph.run_dir):
        return "resume"
    return "restart" if os.path.exists(ph.run_dir) else "fresh"


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
        entry["acc"] = final_accuracies(plan, run)
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
    """Every run of the plan in order, reporting progress; failures do not stop the loop."""
    os.makedirs(plan.out, exist_ok=True)
    state = State(os.path.join(plan.out, STATE_FILE), plan.settings())
    state.save()
    t_start = time.time()
    n = len(plan.runs)
    for k, run in enumerate(plan.runs, 1):
        tag = f"{k}/{n} {run.method} seed {run.seed}"
        entry = state.run(run.key)
        if entry.get("status") == "done" and "acc" in entry:
            say(f"{tag}: finished earlier ({_acc_text(entry['acc'])}), skipped "
                f"(elapsed {fmt_seconds(time.time() - t_start)})")
            continue
        say(f"{tag}: start (elapsed {fmt_seconds(time.time() - t_start)})")
        t0 = time.time()
        ok = execute_run(plan, run, state, job_fn, tag)
        took = fmt_seconds(time.time() - t0)
        total = fmt_seconds(time.time() - t_start)
        if ok:
            say(f"{tag}: done in {took}: {_acc_text(entry['acc'])} (elapsed {total})")
        else:
            say(f"{tag}: FAILED after {took}: {entry['error']}; log: {entry['log']} "
                f"(elapsed {total})")
    return state


def _acc_text(acc: dict) -> str:
    return ", ".join(f"{name} {100 * v:.1f}%" for name, v in acc.items())


# --------------------------------------------------------------------------- results
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


# --------------------------------------------------------------------------- CLI
def dry_run(plan: Plan) -> dict:
    """Print the commands the next real invocation would run (reads the state, if any)."""
    path = os.path.join(plan.out, STATE_FILE)
    runs = {}
    if os.path.isfile(path):
        with open(path) as f:
            runs = json.load(f).get("runs", {})
    count = 0
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srft-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="the trainer's YAML config (every run's "
                                                   "base, e.g. examples/configs/FILE.yaml)")
    p.add_argument("--out", required=True, help="comparison directory (re-use it to resume)")
    p.add_argument("--methods", nargs="+", metavar="M",
                   help=f"methods (default all): {', '.join(METHODS)}")
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
