import json
import os
import time

import pytest
import torch

from srft_mcore.training.metrics import MetricsLogger, ProgressBar, Timer, read_metrics
from srft_mcore.training.plot import group_of, main as plot_main


def _steps(run_dir):
    return [r["step"] for r in read_metrics(str(run_dir))]


def test_logger_writes_json_lines_and_tensorboard(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=True) as m:
        for step in range(3):
            m.log(step, {"reward/mean": torch.tensor(0.25 * step), "loss/total": 1.0 - step,
                         "len/mean": 20 + step, "bad": float("nan"), "note": "x"})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON, one object per line
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["reward/mean"] == 0.5 and rows[2]["loss/total"] == -1.0
    assert rows[1]["len/mean"] == 21 and rows[0]["bad"] is None and rows[0]["note"] == "x"
    assert "NaN" not in "".join(lines)
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [0, 1, 2]
    assert acc.Scalars("reward/mean")[2].value == pytest.approx(0.5)


def test_resume_drops_lines_from_resume_step(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as m:
        for step in range(6):
            m.log(step, {"reward/mean": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/m')  # torn line from a crash
    with MetricsLogger(str(tmp_path), tensorboard=False, resume_step=4) as m:
        assert _steps(tmp_path) == [0, 1, 2, 3]
        m.log(4, {"reward/mean": 40})
    assert _steps(tmp_path) == [0, 1, 2, 3, 4]
    assert read_metrics(str(tmp_path))[-1]["reward/mean"] == 40
    MetricsLogger(str(tmp_path), tensorboard=False).close()  # a fresh run starts over
    assert _steps(tmp_path) == []


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(str(tmp_path / "r"), enabled=False)
    m.log(0, {"a": 1})
    m.close()
    assert not (tmp_path / "r").exists()


def test_wandb_missing_is_a_warning(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="proj") as m:
        m.log(0, {"a": 1.0})
    assert "wandb is not installed" in caplog.text
    assert _steps(tmp_path) == [0]


def test_timer_accumulates_and_resets():
    t = Timer(cuda_sync=False)
    with t("rollout"):
        time.sleep(0.02)
    with t("train"):
        time.sleep(0.01)
    with t("rollout"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError):
        with t("sync"):
            raise RuntimeError("inside")
    out = t.pop()
    assert set(out) == {"time/rollout", "time/train", "time/sync", "time/step"}
    assert out["time/rollout"] >= 0.04 and 0.01 <= out["time/train"] < out["time/rollout"]
    assert out["time/step"] == pytest.approx(sum(v for k, v in out.items() if k != "time/step"))
    assert t.pop() == {"time/step": 0.0}


def test_progress_bar_postfix():
    import io

    out = io.StringIO()
    bar = ProgressBar(total=5, initial=1, file=out)
    post = bar.update({"reward/mean": torch.tensor(0.5), "loss/total": 1.25, "other": 3})
    assert post == {"reward": "0.500", "loss": "1.250"}
    post = bar.update({"loss": 2.0, "loss/total": 1.0, "entropy/rollout": 0.7}, n=0)
    assert post == {"loss": "2.000", "H": "0.700"}
    bar.close()
    assert "2/5" in out.getvalue() and "loss=2.000, H=0.700" in out.getvalue()
    quiet = ProgressBar(total=5, enabled=False, file=out)
    n = len(out.getvalue())
    quiet.update({"reward/mean": 1.0})
    quiet.close()
    assert len(out.getvalue()) == n


def test_plot_groups():
    assert group_of("reward/mean") == "reward" and group_of("acc/val") == "reward"
    assert group_of("entropy/mean") == "entropy"
    assert group_of("weight/w_sft") == "weights" and group_of("w_rl") == "weights"
    assert group_of("loss/sft") == "loss" and group_of("loss/entropy_bonus") == "loss"
    assert group_of("len/response_mean") == "length" and group_of("time/rollout") == "time"
    assert group_of("optim/lr") == "optim" and group_of("something") is None
    # the weight schedule: its weights beside w_sft / w_rl, its averages beside the entropy
    assert group_of("schedule/w_rl") == "weights" and group_of("schedule/h_ema") == "entropy"
    assert group_of("entropy/rollout_pos") == "entropy"


def test_srft_plot(tmp_path, capsys):
    run = tmp_path / "run"
    with MetricsLogger(str(run), tensorboard=False) as m:
        for s in range(5):
            m.log(s, {"reward/mean": s / 5, "entropy/mean": 1.0, "weight/w_sft": 0.3,
                      "weight/w_rl": 0.2, "loss/total": 2.0 - s / 10, "len/mean": 30.0,
                      "time/rollout": 1.0, "time/train": 0.5})
    assert plot_main([str(run)]) == 0
    names = sorted(os.listdir(run / "plots"))
    assert names == ["entropy.png", "entropy_weights.png", "length.png", "loss.png",
                     "overview.png", "reward.png", "time.png", "weights.png"]
    for n in names:
        assert (run / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(run), "--out", str(tmp_path / "o"), "--keys", "reward/mean",
                      "loss/total"]) == 0
    assert os.listdir(tmp_path / "o") == ["keys.png"]
    assert plot_main([str(run), "--keys", "nope"]) == 2
    assert "no numeric values for ['nope']" in capsys.readouterr().err


def test_srft_plot_errors(tmp_path, capsys):
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_main([str(tmp_path)]) == 2
    assert "holds no metrics" in capsys.readouterr().err
