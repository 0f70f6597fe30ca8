"""srft-train as a launcher: a run is checked in the launching process, without torch, before
torchrun starts any rank, so that bad input ends in one paragraph (exit status 2) and never
in torchrun's traceback."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "srft_tiny_cpu.yaml")


def srft_train(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "srft_mcore.training.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_override_is_refused_before_torchrun_starts(tmp_path):
    out = srft_train("--nproc-per-node", "2", "--config", CONFIG,
                     f"logging.run_dir={tmp_path / 'run'}", "algorithm.weight_schedule=cosine")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srft-train: ")  # one paragraph
    assert "algorithm.weight_schedule" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_layout_is_checked_against_the_ranks_launched():
    out = srft_train("--check", "--nproc-per-node", "3", "--config", CONFIG)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not divide the world size 3" in out.stderr
    # nodes x ranks per node: the world size of a multi-node run
    assert srft_train("--check", "--nnodes", "2", "--nproc-per-node", "2",
                      "--config", CONFIG).returncode == 0


def test_an_earlier_run_is_refused_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    args = ("--check", "--nproc-per-node", "2", "--config", CONFIG, f"logging.run_dir={run_dir}")
    out = srft_train(*args)
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert srft_train(*args, "--resume").returncode == 0


def test_check_accepts_the_tiny_config():
    out = srft_train("--check", "--config", CONFIG)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "" and out.stderr == ""


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "srft_mcore.training.cli",
                          "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "--nproc-per-node" in out.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")]
    assert "srft_mcore.training.run_inputs" in imported  # (cli itself runs as __main__)
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_overrides_may_come_before_and_after_the_flags():
    from srft_mcore.training import cli, trainer

    want = ["a.b=1", "c.d=2"]
    args = cli.parse_args(["a.b=1", "--resume", "--nproc-per-node", "2", "c.d=2"])
    assert (args.overrides, args.resume, args.nproc_per_node) == (want, True, 2)
    rank = trainer.parse_args(["--config", "x.yaml", "a.b=1", "--resume", "c.d=2"])
    assert (rank.overrides, rank.resume, rank.config) == (want, True, "x.yaml")
