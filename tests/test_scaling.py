"""The scaling study's table (synthetic runs: config.yaml + metrics.jsonl) and the dry run of
examples/scaling_study.sh (CPU mode with the embedded tiny model, and recipes by name)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from srft_mcore.config import load_config, parse_override
from srft_mcore.planning.scaling_table import format_table, main, summarize_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "scaling_study.sh")


def _write_run(path, cfg: dict, rows: list, torn: bool = False) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"step": 9, "time/st')  # a crash mid-write
    return str(path)


def _step(step, t_step, t_train, rate, **extra):
    return {"step": step, "time/step": t_step, "time/train": t_train,
            "perf/train_tokens_per_s": rate, **extra}


@pytest.fixture
def runs(tmp_path):
    small = _write_run(tmp_path / "qwen-small", {
        "model": {"hf_path": "/data/Qwen2.5-0.5B/", "recompute_granularity": None},
        "parallel": {"tp": 1, "pp": 2, "dp": 4},
        "rollout": {"num_servers": 8, "server_tp": 1, "weight_sync": "tensor"}}, [
        {"step": 0, "eval/math/acc": 0.20, "eval/aime/acc": 0.0},
        _step(1, 100.0, 50.0, 10.0),                      # start-up step: left out
        _step(2, 12.0, 6.0, 1000.0, **{"perf/peak_mem_gb": 30.5}),
        _step(3, 14.0, 7.0, 1000.0, **{"time/eval": 4.0, "eval/math/acc": 0.35,
                                        "eval/aime/acc": 0.1, "perf/peak_mem_gb": 31.25}),
        _step(4, 11.0, 5.5, 1200.0, **{"perf/train_tokens_per_s": None}),  # not finite
    ], torn=True)
    big = _write_run(tmp_path / "qwen-big", {
        "model": {"hf_path": None, "recompute_granularity": "full"},
        "parallel": {"tp": 8, "pp": 5, "dp": 1},
        "rollout": {"urls": ["http://a:1", "http://b:1"], "router_url": "http://r:2"}}, [
        _step(1, 30.0, 20.0, 500.0, **{"eval/math/acc": 0.5})])
    return small, big, str(tmp_path / "qwen-missing")


def test_run_summary_from_metrics(runs):
    small, big, missing = runs
    s = summarize_run(small)
    assert s["name"] == "qwen-small" and s["model"] == "Qwen2.5-0.5B"
    assert s["layout"] == "TP1 PP2 DP4; rollout 8 x TP1 colocated"
    assert s["steps"] == 4  # the torn last line is skipped
    # steps 2-4 (step 1 left out), step 3 without its 4 s of evaluation: median(12, 10, 11)
    assert s["step_s"] == pytest.approx(11.0)
    # trained tokens / step time: 1000*6/12 = 500, 1000*7/10 = 700 (step 4 has no rate)
    assert s["tokens_per_s"] == pytest.approx(600.0)
    assert s["train_tokens_per_s"] == pytest.approx(1000.0)
    assert s["peak_mem_gb"] == pytest.approx(31.25)
    assert s["acc"] == {"math": [0.20, 0.35], "aime": [0.0, 0.1]}
    b = summarize_run(big)
    assert b["model"] == "embedded tiny" and b["steps"] == 1
    assert b["layout"] == "TP8 PP5 DP1, recompute full; rollout 2 servers by URL + router"
    assert b["step_s"] == pytest.approx(30.0)  # a single step is all there is
    assert b["peak_mem_gb"] is None and b["acc"] == {"math": [0.5, 0.5]}
    m = summarize_run(missing)
    assert m["steps"] == 0 and m["step_s"] is None and m["layout"] == "?"


def test_table_has_one_row_per_run_and_a_column_per_split(runs, capsys):
    rows = [summarize_run(d) for d in runs]
    lines = format_table(rows).splitlines()
    assert lines[0] == ("| run | model | layout | steps | step s | tokens/s | train tok/s | "
                        "peak GB | acc aime | acc math |")
    assert len(lines) == 2 + 3
    assert lines[2] == ("| qwen-small | Qwen2.5-0.5B | TP1 PP2 DP4; rollout 8 x TP1 colocated "
                        "| 4 | 11.00 | 600 | 1,000 | 31.2 | 0.000 -> 0.100 | 0.200 -> 0.350 |")
    assert lines[3].endswith("| 1 | 30.00 | 333 | 500 | - | - | 0.500 |")
    assert lines[4] == "| qwen-missing | ? | ? | not run | - | - | - | - | - | - |"
    assert main([*runs, "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [
        "qwen-small", "qwen-big", "qwen-missing"]


# --------------------------------------------------------------------------- the script
def _study(tmp_path, *args, **env):
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable,
            "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", SCRIPT, "--dry-run", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_cpu_dry_run_runs_each_size_then_the_table_and_resumes(tmp_path):
    out = tmp_path / "out"
    (out / "tiny-tp1").mkdir(parents=True)
    (out / "tiny-tp1" / "DONE").touch()  # finished: skipped
    (out / "tiny-tp2").mkdir()           # started: resumed
    lines = _study(tmp_path, "optimizer.lr=1e-3", CPU="1", STEPS="3")
    assert lines[0] == "# tiny-tp1: finished (%s/tiny-tp1/DONE), skipped" % out
    cmd = [ln for ln in lines if "srft_mcore.training.cli" in ln]
    assert len(cmd) == 1
    assert ("-m srft_mcore.training.cli --nproc_per_node=2 --config examples/configs/srft_tiny_cpu.yaml "
            "--resume" in cmd[0])
    for part in ("parallel.tp=2", "model.hf_path=null", "train.steps=3", "eval.every=3",
                 "eval.limit=50", f"logging.run_dir={out}/tiny-tp2", "optimizer.lr=1e-3"):
        assert f" {part}" in cmd[0]
    assert cmd[0].index("train.steps=3") < cmd[0].index("optimizer.lr=1e-3")  # user's win
    assert lines[-1].endswith(f"-m srft_mcore.planning.scaling_table {out}/tiny-tp1 {out}/tiny-tp2")
    assert not (out / "scaling_table.md").exists()
    fresh = _study(tmp_path, CPU="1", STEPS="3", OUT=str(tmp_path / "fresh"))
    cmd = [ln for ln in fresh if "srft_mcore.training.cli" in ln]
    assert [c.split("--nproc_per_node=")[1].split()[0] for c in cmd] == ["1", "2"]
    assert not any("--resume" in c for c in cmd)
    assert not (tmp_path / "fresh").exists()  # a dry run writes nothing


def test_recipe_dry_run_shares_data_steps_and_eval_and_skips_multi_node(tmp_path):
    lines = _study(tmp_path, MODELS="qwen2.5-0.5b=/m/q05 qwen2.5-32b=/m/q32",
                   DATA_PATH="/d/train.parquet", STEPS="10",
                   EVAL_SPLITS="math500=/d/math.jsonl aime=/d/aime.parquet")
    cmd = [ln for ln in lines if "srft_mcore.training.cli" in ln]
    assert len(cmd) == 1 and "--nproc_per_node=8" in cmd[0]
    assert "--config examples/configs/recipes/qwen2.5-0.5b.yaml" in cmd[0]
    assert " data.path=/d/train.parquet" in cmd[0] and " train.steps=10" in cmd[0]
    skipped = [ln for ln in lines if ln.startswith("# qwen2.5-32b: skipped")]
    assert skipped and "sbatch --nodes=4" in skipped[0]
    # the eval.splits override, unquoted as the shell would, is the mapping of both files
    arg = [a for a in cmd[0].split(" eval.splits=")[1:]][0].split(" logging.")[0]
    text = "eval.splits=" + subprocess.run(["bash", "-c", f"printf %s {arg}"],
                                           capture_output=True, text=True).stdout
    assert parse_override(text) == ("eval.splits", {"math500": "/d/math.jsonl",
                                                    "aime": "/d/aime.parquet"})
    cfg = load_config(os.path.join(ROOT, "examples/configs/recipes/qwen2.5-0.5b.yaml"), [text])
    assert cfg.eval.splits["aime"] == "/d/aime.parquet"
