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

from srft_mcore.comparison.run_plan import CompareError, Phase, Plan, Run


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
            "--config", plan.config, *phase.overrides, *server_overrides(plan)] + (
        ["--resume"] if resume else [])


def server_overrides(plan: Plan, url: Optional[str] = None) -> list:
    """``--shared-server``: attach to the comparison's server and sync through the disk (the
    trainer syncs an attached server before its first rollout)."""
    url = url or plan.server_url
    if not plan.options.get("shared_server") or url is None:
        return []
    return [f'rollout.urls=["{url}"]', "rollout.weight_sync=disk"]


class SharedServer:
    """One SGLang server of the base model for every launch of a comparison (a start costs
    tens of seconds of two cores; a run's first weight sync replaces the weights the last
    run left). ``lease()`` returns its URL, restarted if it died, with generation resumed
    and the cache flushed (a killed trainer may have paused it)."""

    def __init__(self, plan: Plan):
        self.plan, self.server, self.starts = plan, None, 0
        url = plan.options.get("shared_server")
        if url not in (None, "launch"):  # the user's running server: attached, never stopped
            from srft_mcore.rollout.server import SGLangServer

            self.server = SGLangServer.attach(url)

    def _launch(self):
        import json as _json

        from srft_mcore.models.tiny import resolve_model_dir
        from srft_mcore.rollout.server import SGLangServer, context_server_args

        cfg = self.plan.base
        model_dir = resolve_model_dir(cfg)
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = _json.load(f)
        self.starts += 1
        log = os.path.join(self.plan.out, "logs", f"shared_sglang_{self.starts}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        self.server = SGLangServer.launch(
            model_dir, log_path=log, startup_timeout_s=cfg.rollout.startup_timeout_s,
            extra_args=[*context_server_args(cfg, hf), "--dtype", cfg.model.dtype])

    def lease(self) -> str:
        import requests

        if self.server is None or not self.server.healthy():
            if self.server is not None and not self.server.owned:
                raise CompareError(f"the shared server {self.server.url} does not answer. Fix: "
                                   f"restart it, or use --shared-server alone (the driver "
                                   f"starts one)")
            if self.server is not None:
                self.server.stop()
            self._launch()
        for path in ("/continue_generation", "/flush_cache"):
            requests.post(self.server.url + path, json={}, timeout=120)
        return self.server.url

    def evaluate_base(self, seed: int) -> dict:
        """The base model's accuracy, truncation rate and mean length per split, through this
        server before any run has synced into it, with the decoding of the trainer's final
        evaluation (``eval.*``; seeded as a run of this seed when rollouts are seeded)."""
        from srft_mcore.evaluation.runner import evaluate_splits, paper_sampling
        from srft_mcore.models.tiny import load_tokenizer, resolve_model_dir
        from srft_mcore.rollout.seeded import mix_seed

        cfg = self.plan.base
        url = self.lease()
        sampling = paper_sampling(
            seed=mix_seed(seed, 0xE7A1, 0) if cfg.rollout.seeded else None,
            temperature=cfg.eval.temperature,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_response_len)
        metrics = evaluate_splits([url], load_tokenizer(resolve_model_dir(cfg)),
                                  self.plan.splits, template=cfg.data.template,
                                  sampling=sampling, n_samples=cfg.eval.n_samples,
                                  out_dir=os.path.join(self.plan.out, "base_eval",
                                                       f"seed{seed}"))
        return {field: {name: metrics[f"eval/{name}/{field}"] for name in self.plan.splits
                        if f"eval/{name}/{field}" in metrics}
                for field in ("acc", "truncation_rate", "mean_tokens")}

    def stop(self) -> None:
        if self.server is not None and self.server.owned:
            self.server.stop()
        self.server = None


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
