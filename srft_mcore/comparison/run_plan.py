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
    "srft_adv": ("SRFT, advantage form", ("srft",)),
}
METHOD_OVERRIDES = {"srft_adv": ["algorithm.onpolicy_form=ppo"]}
"""Settings a method adds to every launch: ``srft_adv`` is SRFT with the on-policy term in
its advantage form (-A * ratio with Eq. 7 advantages) instead of Eq. 11's sign form."""
DEFAULT_METHODS = ("sft", "grpo", "sft_rl", "luffy", "srft", "srft_no_wsft", "srft_no_wrl")
"""The paper's Table 2 methods and ablations: what ``--methods`` defaults to."""
VARIANT_BASE: dict = {}
"""``--variant NAME=METHOD``: the method each variant copies (with its own overrides)."""


def base_method(method: str) -> str:
    """The built-in method a run is (a variant's base, else itself)."""
    return VARIANT_BASE.get(method, method)


def add_variant(name: str, method: str, overrides: list) -> None:
    """Register ``name``: ``method`` with ``overrides`` added to every launch (e.g. SRFT with
    another entropy-weight schedule, or SFT on corrupted demonstrations). Registering a
    variant's name again replaces it."""
    if not name.isidentifier() or (name in METHODS and name not in VARIANT_BASE):
        raise CompareError(f"--variant {name}={method}: the name must be a new identifier "
                           f"(not one of {', '.join(METHODS)}). Fix: e.g. srft_ema=srft")
    if method not in METHODS or method in VARIANT_BASE:
        raise CompareError(f"--variant {name}={method}: {method!r} is not a built-in method. "
                           f"Fix: one of {', '.join(m for m in METHODS if m not in VARIANT_BASE)}")
    METHODS[name] = (name, METHODS[method][1])
    METHOD_OVERRIDES[name] = [*METHOD_OVERRIDES.get(method, []), *overrides]
    VARIANT_BASE[name] = method
PHASE_NAMES = {1: ("train",), 2: ("sft", "rl")}
"""Subdirectory of each trainer launch of a method (one launch: the run directory itself)."""
DEFAULT_SEEDS = (1, 2, 3)
OWNED_KEYS = ("algorithm.name", "train.steps", "train.seed", "data.shuffle_seed",
              "logging.run_dir", "checkpoint.dir", "checkpoint.resume", "model.load_mcore",
              "model.load_optimizer")
"""Set per run by the driver; an override of one of them is refused."""
GRID_KEYS = ("optimizer.lr",)
"""Set per run by the driver when it chooses learning rates (``--lr-grid``)."""
SHARED_SERVER_KEYS = ("rollout.urls", "rollout.router_url", "rollout.weight_sync")
"""Set per run by the driver when its runs share one server (``--shared-server``)."""
FINAL_EVALS = ("srft-eval", "trainer")
MIN_GRID = 3


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
    lr: Optional[float] = None
    """The run's learning rate (``--lr-grid``); None: the config's."""

    @property
    def key(self) -> str:
        if self.lr is None:
            return f"{self.method}/seed{self.seed}"
        return f"{self.method}/lr{lr_text(self.lr)}/seed{self.seed}"

    @property
    def label(self) -> str:
        return METHODS[self.method][0]

    @property
    def final_dir(self) -> str:
        """The run directory holding the final policy."""
        return self.phases[-1].run_dir

    def log_path(self, out: str, part: str) -> str:
        lr = "" if self.lr is None else f"_lr{lr_text(self.lr)}"
        return os.path.join(out, "logs", f"{self.method}{lr}_seed{self.seed}_{part}.log")


def lr_text(lr: float) -> str:
    """A learning rate as it appears in run keys and directories (2e-03)."""
    return f"{lr:.0e}" if float(f"{lr:.0e}") == lr else f"{lr:g}"


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
    """name -> file of every split each run is scored on (the validation split first)."""
    base: object
    """The config with the user's overrides (the values every run shares)."""
    runs: list = field(default_factory=list)
    lrs: Optional[list] = None
    """``--lr-grid``: each method's lr is chosen among these on the validation split."""
    val_split: Optional[str] = None
    """The validation split's name (in ``splits``); settings are chosen on it only."""
    options: dict = field(default_factory=dict)
    """Method options: sft_rl_warmup, sft_rl_carry_optimizer, luffy_demo_slot, shared_server."""
    server_url: Optional[str] = None
    """``--shared-server``: the URL of the server every launch attaches to (set while the
    comparison runs)."""

    @property
    def held_out(self) -> list:
        """The splits results are reported on: every split but the validation split."""
        return [name for name in self.splits if name != self.val_split]

    def settings(self) -> dict:
        """What a re-run must repeat to reuse the finished runs in ``out``: the config every
        run shares (file + overrides, as values), the steps and the final evaluation."""
        resolved = json.dumps(self.base.to_dict(), sort_keys=True, default=str)
        return {"config_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
                "steps": self.steps, "final_eval": self.final_eval,
                "eval_limit": self.eval_limit, "lrs": self.lrs, "val_split": self.val_split,
                "options": {k: v for k, v in self.options.items() if k != "shared_server"},
                "variants": {m: [VARIANT_BASE[m], *METHOD_OVERRIDES[m]] for m in self.methods
                             if m in VARIANT_BASE}}

    def budget(self) -> dict:
        t, r = self.base.train, self.base.rollout
        return {"steps": self.steps, "prompts_per_step": t.prompts_per_step,
                "rollouts_per_prompt": r.n_samples,
                "rollouts_per_run": self.steps * t.prompts_per_step * r.n_samples,
                "sft_rl_steps": list(split_steps(self.steps)),
                "luffy_rollouts_per_prompt": luffy_rollouts(self)}

    def method_runs(self, method: str, lr: Optional[float] = None) -> list:
        """The runs of ``method`` (at ``lr`` when given), in seed order."""
        return sorted((r for r in self.runs if r.method == method
                       and (lr is None or r.lr == lr)), key=lambda r: r.seed)


def luffy_rollouts(plan: "Plan") -> int:
    """LUFFY's rollouts per prompt: with ``--luffy-demo-slot`` the demonstration takes one
    rollout's place in the group (LUFFY's 7 + 1 of 8), else the config's n."""
    n = plan.base.rollout.n_samples
    return n - 1 if plan.options.get("luffy_demo_slot") else n


def split_steps(steps: int) -> tuple:
    """SFT->RL: the SFT run's and the RL run's steps; together the other methods' budget."""
    return steps // 2, steps - steps // 2


def shuffle_seed(base: int, seed: int, phase: int = 0) -> int:
    """The prompt-order seed of a run: far from the other seeds' (the sampler seeds each
    epoch with shuffle_seed + epoch, so neighbouring integers would share orders)."""
    digest = hashlib.sha256(f"srft-compare:{base}:{seed}:{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2 ** 31


def build_plan(args) -> Plan:
    """Check the input and lay out every run; reads files, writes nothing. With a learning
    rate grid the plan holds the selection runs (first seed, every lr); the other seeds'
    runs are added once the choice is made (:func:`add_final_runs`)."""
    config = os.path.abspath(args.config)
    extra = list(args.overrides)
    lrs = getattr(args, "lr_grid", None)
    shared = getattr(args, "shared_server", None)
    if shared not in (None, "launch") and not shared.startswith(("http://", "https://")):
        raise CompareError(f"--shared-server {shared}: not a URL. Fix: --shared-server alone "
                           f"(the driver starts one) or --shared-server http://HOST:PORT")
    owned = OWNED_KEYS + (GRID_KEYS if lrs else ()) + (SHARED_SERVER_KEYS if shared else ())
    for text in extra:
        key, _ = parse_override(text)
        if key in owned:
            raise CompareError(f"override {text!r}: srft-compare sets {key} for each run. Fix: "
                               f"drop it (steps: --steps; seeds: --seeds; run directories: "
                               f"--out; learning rates: --lr-grid; servers: --shared-server)")
    base = load_config(config, extra)
    steps = args.steps if args.steps is not None else base.train.steps
    methods = args.methods or list(DEFAULT_METHODS)
    seeds = args.seeds or list(DEFAULT_SEEDS)
    for name, values in (("--methods", methods), ("--seeds", seeds), ("--lr-grid", lrs or [])):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise CompareError(f"{name}: {dup} given twice. Fix: name each once")
    if lrs is not None and (len(lrs) < MIN_GRID or min(lrs) <= 0):
        raise CompareError(f"--lr-grid {lrs}: need at least {MIN_GRID} positive learning rates "
                           f"to choose from. Fix: e.g. --lr-grid 1e-3 2e-3 4e-3")
    if steps < 1 or ("sft_rl" in methods and steps < 2):
        raise CompareError(f"--steps {steps}: need at least {2 if 'sft_rl' in methods else 1} "
                           f"(SFT->RL splits them into an SFT and an RL run). Fix: more steps")
    if args.final_eval == "trainer" and not base.eval.every:
        raise CompareError("--final-eval trainer needs the trainer's evaluation, but eval.every "
                           "is 0. Fix: set eval.every=K (it also evaluates the last step), or "
                           "use --final-eval srft-eval")
    out = os.path.abspath(args.out)
    splits, val_split = _splits(base, getattr(args, "val_split", None), lrs is not None)
    p = base.parallel
    nproc = args.nproc_per_node or p.tp * p.pp * p.cp * (p.dp or 1)
    warmup = getattr(args, "sft_rl_warmup", None)
    if warmup is not None and not 0 <= warmup < split_steps(steps)[1]:
        raise CompareError(f"--sft-rl-warmup {warmup}: must be >= 0 and below the RL run's "
                           f"{split_steps(steps)[1]} steps. Fix: a smaller warm-up")
    options = {"sft_rl_warmup": warmup if warmup is not None else default_warmup(steps),
               "sft_rl_carry_optimizer": bool(getattr(args, "sft_rl_carry_optimizer", False)),
               "luffy_demo_slot": bool(getattr(args, "luffy_demo_slot", False)),
               "shared_server": shared}
    """shared_server: None (a server per launch), "launch" (the driver's) or a URL."""
    plan = Plan(config=config, out=out, steps=steps, methods=methods, seeds=seeds, extra=extra,
                final_eval=args.final_eval, eval_limit=args.eval_limit, nproc=nproc,
                python=args.python or sys.executable, splits=splits, base=base, lrs=lrs,
                val_split=val_split, options=options,
                server_url=shared if shared not in (None, "launch") else None)
    if options["luffy_demo_slot"] and "luffy" in methods and luffy_rollouts(plan) < 1:
        raise CompareError("--luffy-demo-slot needs rollout.n_samples >= 2 (the demonstration "
                           "takes one rollout's place). Fix: raise rollout.n_samples")
    if lrs is None:
        for seed in seeds:  # seed-major: a partial comparison has every method's first seeds
            plan.runs += [make_run(plan, method, seed) for method in methods]
    else:
        for lr in lrs:
            plan.runs += [make_run(plan, method, seeds[0], lr) for method in methods]
    return plan


def default_warmup(steps: int) -> int:
    """SFT->RL's RL run warms its lr up over a tenth of its steps (at least one, when it has
    more than one step)."""
    rl_steps = split_steps(steps)[1]
    return min(max(1, rl_steps // 10), rl_steps - 1)


def _splits(base, val_name: Optional[str], need_val: bool) -> tuple:
    """(name -> file of every split, the validation split's name or None): the config's
    ``eval.splits``, else the embedded task's ``val``, ``id`` and ``ood``."""
    splits = dict(base.eval.splits or {})
    if not splits and base.data.path is None:  # the embedded task's, as the trainer's
        from srft_mcore.data.embedded import embedded_eval_splits, embedded_validation_split

        splits = {**embedded_validation_split(), **embedded_eval_splits()}
    if not splits:
        raise CompareError("no held-out splits to score the final policies on: the config "
                           "trains on data.path and has no eval.splits. Fix: add "
                           "eval.splits={name: FILE, ...} (srft-eval layouts)")
    name = val_name or ("val" if "val" in splits else None)
    if name is not None and name not in splits:
        raise CompareError(f"--val-split {name}: no such split (the splits: "
                           f"{', '.join(splits)}). Fix: add it to eval.splits, or name one of "
                           f"those")
    if need_val and name is None:
        raise CompareError("--lr-grid chooses each method's lr on a validation split, and "
                           "there is none: eval.splits has no 'val'. Fix: add val=FILE (problems "
                           "from the training distribution, disjoint from the training data and "
                           "the held-out splits) to eval.splits, or name one with --val-split")
    if name is not None and len(splits) < 2:
        raise CompareError(f"the only split is the validation split {name!r}: nothing to report "
                           f"results on. Fix: add held-out splits to eval.splits")
    splits = {n: os.path.abspath(path) for n, path in splits.items()}
    if name is not None:  # the validation split first
        splits = {name: splits[name], **{n: v for n, v in splits.items() if n != name}}
    return splits, name


def make_run(plan: Plan, method: str, seed: int, lr: Optional[float] = None) -> Run:
    """One method, seed (and lr): its trainer launches' overrides and directories."""
    algos = METHODS[method][1]
    phase_steps = split_steps(plan.steps) if len(algos) == 2 else (plan.steps,)
    run_dir = os.path.join(plan.out, "runs", method,
                           *([] if lr is None else [f"lr{lr_text(lr)}"]), f"seed{seed}")
    shared = ["logging.progress_bar=false", *plan.extra]
    shared += METHOD_OVERRIDES.get(method, [])
    if lr is not None:
        shared.append(f"optimizer.lr={lr!r}")
    if base_method(method) == "luffy" and plan.options.get("luffy_demo_slot"):
        shared.append(f"rollout.n_samples={luffy_rollouts(plan)}")
    phases = []
    for i, (name, algo, n) in enumerate(zip(PHASE_NAMES[len(algos)], algos, phase_steps)):
        pdir = run_dir if len(algos) == 1 else os.path.join(run_dir, name)
        start = (os.path.join(phases[-1].run_dir, "checkpoints", f"step_{phases[-1].steps:06d}")
                 if phases else None)
        own = [f"algorithm.name={algo}", f"train.steps={n}", f"train.seed={seed}",
               f"data.shuffle_seed={shuffle_seed(plan.base.data.shuffle_seed, seed, i)}",
               f"logging.run_dir={pdir}"]
        if start is not None:  # SFT->RL's RL run: from the SFT run, its lr warmed up again
            own += [f"model.load_mcore={start}",
                    f"optimizer.warmup_steps={plan.options.get('sft_rl_warmup', 0)}"]
            if plan.options.get("sft_rl_carry_optimizer"):
                own.append("model.load_optimizer=true")
        phases.append(Phase(name, algo, n, pdir, shared + own, start))
    return Run(method, seed, run_dir, phases, os.path.join(run_dir, "final_eval"), lr)


def add_final_runs(plan: Plan, chosen: dict) -> list:
    """After the lr choice: every further seed of each method at its chosen lr (the first
    seed's run at that lr is the selection run itself). Returns the new runs."""
    new = [make_run(plan, method, seed, chosen[method]) for seed in plan.seeds[1:]
           for method in plan.methods if method in chosen]
    plan.runs += new
    return new


def check_configs(plan: Plan) -> None:
    """Every launch's config passes the trainer's checks before anything starts."""
    from srft_mcore.comparison.jobs import server_overrides

    attached = server_overrides(plan, "http://127.0.0.1:1")  # any URL: checked for form
    for run in plan.runs:
        for ph in run.phases:
            try:
                validate(load_config(plan.config, ph.overrides + attached),
                         world_size=plan.nproc)
            except ConfigError as e:
                raise CompareError(f"{run.key} ({ph.name}): {e}") from None
