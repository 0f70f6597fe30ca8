"""The plan of a comparison: the methods, and for every method and seed its run directory,
its trainer launches (their overrides and steps) and where its final evaluation goes; checked
before anything starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

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


class CompareError(ValueError):
    """Bad input to the comparison; the message ends with the fix."""


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
