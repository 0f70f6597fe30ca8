"""Run metrics: one JSON line per step in ``<run_dir>/metrics.jsonl``, TensorBoard scalars,
optional Weights & Biases, a rank-0 progress bar and a wall-clock timer for the step split.

Key names are ``group/name`` so ``srft-plot`` can group the curves: ``reward/*``, ``acc/*``,
``entropy/*``, ``weight/w_sft`` and ``weight/w_rl``, ``loss/*``, ``len/*`` (response lengths),
``time/*`` (seconds per phase, see :class:`Timer`), ``optim/*`` (lr, grad norm).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Iterable, Optional

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _scalar(value):
    """Plain Python number for tensors / numpy scalars; None for what is not a number."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_metrics(path: str) -> list:
    """Records of a metrics.jsonl (a run directory or the file); a torn last line (a crash
    mid-write) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def truncate_metrics(path: str, resume_step: int) -> int:
    """Drop the lines with ``step >= resume_step`` (written after the checkpoint a run
    resumes from); atomic rewrite. Returns the number of lines kept."""
    if not os.path.exists(path):
        return 0
    kept = [r for r in read_metrics(path) if r["step"] < resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(kept)


class MetricsLogger:
    """Per-step metrics sink; construct it on every rank, only ``enabled`` ones write.

    ``resume_step=None`` starts a fresh ``metrics.jsonl`` (an existing one is replaced);
    ``resume_step=k`` keeps the lines of steps < k and appends after them, and TensorBoard
    purges its events from step k on.
    """

    def __init__(self, run_dir: str, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, resume_step: Optional[int] = None,
                 enabled: bool = True, config: Optional[dict] = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                log.warning("logging.tensorboard=true but tensorboard is not importable (%s); "
                            "TensorBoard logging is off (pip install tensorboard)", e)
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                         purge_step=resume_step)
        if wandb_project:
            self._wandb = self._init_wandb(wandb_project, config, resume_step is not None)

    def _init_wandb(self, project: str, config: Optional[dict], resume: bool):
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb_project=%r but wandb is not installed; W&B logging is "
                        "off (pip install wandb)", project)
            return None
        id_file = os.path.join(self.run_dir, "wandb_id.txt")
        run_id = None
        if resume and os.path.exists(id_file):
            run_id = open(id_file).read().strip() or None
        run = wandb.init(project=project, dir=self.run_dir, config=config, id=run_id,
                         resume="allow" if run_id else None)
        with open(id_file, "w") as f:
            f.write(run.id)
        return run

    def log(self, step: int, metrics: dict) -> None:
        """One line ``{"step": step, "wall_time": ..., **metrics}``, flushed at once."""
        if not self.enabled:
            return
        row = {"step": int(step), "wall_time": round(time.time(), 3)}
        scalars = {}
        for key, value in metrics.items():
            v = _scalar(value)
            if v is None:
                row[key] = value if isinstance(value, str) else None
                continue
            scalars[key] = v
            row[key] = v if math.isfinite(v) else None  # strict JSON: no NaN / Infinity
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, v in scalars.items():
                self._tb.add_scalar(key, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProgressBar:
    """tqdm bar over training steps (rank 0) with the latest reward / loss as postfix."""

    # (label, keys tried in order): the first key present in a step's metrics is shown
    SHOWN = (("reward", ("reward/mean",)), ("acc", ("acc/mean",)),
             ("loss", ("loss", "loss/total")), ("H", ("entropy/rollout", "entropy/mean")))

    def __init__(self, total: int, initial: int = 0, enabled: bool = True,
                 shown: Optional[Iterable] = None, file=None):
        from tqdm import tqdm

        self.shown = tuple(shown) if shown is not None else self.SHOWN
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="srft",
                        unit="step", dynamic_ncols=True, file=file)

    def update(self, metrics: Optional[dict] = None, n: int = 1) -> dict:
        post = {}
        metrics = metrics or {}
        for label, keys in self.shown:
            present = [k for k in keys if metrics.get(k) is not None]
            v = _scalar(metrics[present[0]]) if present else None
            if v is not None:
                post[label] = f"{v:.3f}"
        if post:
            self.bar.set_postfix(post, refresh=False)  # drawn by the update below
        self.bar.update(n)
        return post

    def close(self) -> None:
        self.bar.close()


class Timer:
    """Wall-clock seconds per named phase of a step::

        timer = Timer()
        with timer("rollout"):
            ...
        metrics.update(timer.pop())   # {"time/rollout": 1.2, ..., "time/step": 3.4}

    Repeated phases within a step add up. ``cuda_sync`` waits for queued GPU work at each
    boundary so a phase is charged its own kernels.
    """

    def __init__(self, cuda_sync: bool = True):
        self.cuda_sync = cuda_sync
        self.totals: dict = {}

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self, prefix: str = "time/") -> dict:
        """The phase totals since the last pop (plus their sum as ``step``), then reset."""
        out = {f"{prefix}{k}": v for k, v in self.totals.items()}
        out[f"{prefix}step"] = sum(self.totals.values())
        self.totals = {}
        return out
