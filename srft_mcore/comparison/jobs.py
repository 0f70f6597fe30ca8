"""The processes a comparison starts: the command line of each trainer launch and
srft-eval pass, and the one function that runs them.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from srft_mcore.comparison.run_plan import Phase, Plan, Run


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
    return [plan.python, "-m", "srft_mcore.training.cli", f"--nproc_per_node={plan.nproc}",
            "--config", plan.config, *phase.overrides] + (["--resume"] if resume else [])


def eval_command(plan: Plan, run: Run) -> list:
    e, d = plan.base.eval, plan.base.data
    cmd = [plan.python, "-m", "srft_mcore.evaluation.cli", "--model", run.final_dir]
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
