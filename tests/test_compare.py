"""srft-compare: plan, bookkeeping (skip / resume / restart / failure), aggregation, outputs.

The launches are replaced by a stand-in that writes what the trainer and srft-eval write
(metrics.jsonl, checkpoints, hf_final, results.json), so the driver's logic runs for real in
well under a second per invocation; one slow test runs SFT->RL with real trainer launches
(the hand-off of the SFT run's weights to the GRPO run).
"""
import json
import math
import os
import shlex

import pytest

from srft_mcore.comparison.cli import main, parse_args
from srft_mcore.comparison.results import mean_curve, mean_std, pct, run_curves
from srft_mcore.comparison.run_plan import build_plan
from srft_mcore.training.checkpoint import step_dir_name
from srft_mcore.data.embedded import embedded_eval_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "srft_tiny_cpu.yaml")
# final accuracies the stand-in srft-eval reports, per (method, seed)
ACC = {("srft", 1): (0.5, 0.1), ("srft", 2): (0.6, 0.2), ("srft", 3): (0.7, 0.6),
       ("grpo", 1): (0.4, 0.0), ("grpo", 2): (0.2, 0.1), ("grpo", 3): (0.3, 0.2)}


def val_acc(run):
    """The stand-in's validation accuracy: with an lr grid, best at lr 2e-3 for SRFT and at
    1e-3 for the others (the held-out accuracies do not depend on the lr at all)."""
    if run.lr is None:
        return 0.3
    best = 2e-3 if run.method == "srft" else 1e-3
    return 0.5 - abs(math.log10(run.lr / best))


class FakeLauncher:
    """Stands in for :func:`srft_mcore.comparison.jobs.launch`: records each job and writes
    the files of a finished trainer run / srft-eval pass. ``fail``: {(run key, part): exit status};
    ``interrupt``: {(run key, part): "checkpoint" | "no-checkpoint"}: write a partial run
    (with or without a checkpoint) and raise KeyboardInterrupt, as a Ctrl-C would."""

    def __init__(self, fail=None, interrupt=None):
        self.jobs = []
        self.fail = fail or {}
        self.interrupt = interrupt or {}

    def __call__(self, job):
        part = job.phase.name if job.kind == "train" else "eval"
        self.jobs.append(job)
        os.makedirs(os.path.dirname(job.log), exist_ok=True)
        with open(job.log, "a") as f:
            f.write(shlex.join(job.cmd) + "\n")
        key = (job.run.key, part)
        if job.kind == "eval":
            return self._eval(job, key)
        ph = job.phase
        metrics = os.path.join(ph.run_dir, "metrics.jsonl")
        if job.resume:  # the trainer resumes from the latest checkpoint
            assert os.path.isfile(os.path.join(ph.run_dir, "checkpoints", "latest"))
        else:  # the trainer refuses a directory that holds a run
            assert not os.path.exists(metrics)
        if key in self.interrupt:
            self._write_run(ph, job.run, steps=1, checkpoint=self.interrupt[key] == "checkpoint")
            raise KeyboardInterrupt
        if key in self.fail:
            self._write_run(ph, job.run, steps=1, checkpoint=False)
            with open(job.log, "a") as f:
                f.write("srft-train: something went wrong\n")
            return self.fail[key]
        self._write_run(ph, job.run, steps=ph.steps, checkpoint=True)
        return 0

    def _write_run(self, ph, run, steps, checkpoint):
        os.makedirs(ph.run_dir, exist_ok=True)
        acc = ACC.get((run.method, run.seed), (0.25, 0.05))
        rows = [{"step": 0, "wall_time": 0.0, "eval/id/acc": 0.1, "eval/ood/acc": 0.0}]
        for s in range(1, steps + 1):
            row = {"step": s, "wall_time": float(s), "entropy/step": 1.0 / s + run.seed,
                   "len/clipped_frac": 0.1,
                   "reward/mean": 0.1 * s, "acc/mean": 0.1 * s}
            if s == ph.steps:  # the trainer's evaluation at the last step
                row.update({"eval/id/acc": acc[0] - 0.05, "eval/ood/acc": acc[1],
                            "eval/val/acc": val_acc(run), "eval/id/truncation_rate": 0.25,
                            "eval/ood/truncation_rate": 0.5, "eval/val/truncation_rate": 0.0,
                            "ledger/prompts": 4, "ledger/rollout_tokens": 100,
                            "ledger/demo_tokens": 30, "ledger/trained_tokens": 130})
            rows.append(row)
        with open(os.path.join(ph.run_dir, "metrics.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if checkpoint:  # named as the trainer names them (the real hand-off: below)
            name = step_dir_name(steps)
            os.makedirs(os.path.join(ph.run_dir, "checkpoints", name), exist_ok=True)
            with open(os.path.join(ph.run_dir, "checkpoints", name, "trainer_state.json"),
                      "w") as f:
                json.dump({"step": steps}, f)
            with open(os.path.join(ph.run_dir, "checkpoints", "latest"), "w") as f:
                f.write(name)
        if steps == ph.steps:
            os.makedirs(os.path.join(ph.run_dir, "hf_final"), exist_ok=True)

    def _eval(self, job, key):
        if key in self.fail:
            return self.fail[key]
        out = job.cmd[job.cmd.index("--out") + 1]
        names = [a.split("=", 1)[0] for a in job.cmd[1:]
                 if a.startswith(("id=", "ood=", "val="))]
        acc = dict(zip(("id", "ood"), ACC.get((job.run.method, job.run.seed), (0.25, 0.05))),
                   val=val_acc(job.run))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"results": {n: {"acc": acc[n], "n": 200, "metric": "pass@1",
                                       "truncation_rate": 0.1}
                                   for n in names}}, f)
        return 0

    def launched(self, kind="train"):
        return [(j.run.key, j.phase.name if j.phase else "eval", j.resume) for j in self.jobs
                if j.kind == kind]


def _main(tmp_path, capsys, *argv, fake=None, steps="4"):
    fake = fake if fake is not None else FakeLauncher()
    rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--steps", steps,
               *argv], job_fn=fake)
    out = capsys.readouterr().out
    return rc, out, json.loads(out.strip().splitlines()[-1]), fake


def test_dry_run_commands(tmp_path, capsys):
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "sft_rl", "grpo",
                                   "--seeds", "1", "2", "optimizer.lr=1e-3", "--dry-run",
                                   steps="5")
    assert rc == 0 and not fake.jobs and summary["dry_run"] is True
    assert not (tmp_path / "cmp").exists()  # nothing written
    cmds = [shlex.split(line) for line in out.splitlines()
            if line and not line.startswith(("#", "{"))]
    train = [c for c in cmds if "srft_mcore.training.cli" in c]
    evals = [c for c in cmds if "srft_mcore.evaluation.cli" in c]
    assert len(train) == 2 * (1 + 2 + 1) and len(evals) == 2 * 3
    assert summary["commands"] == len(cmds)

    def opt(cmd, key):
        vals = [a.split("=", 1)[1] for a in cmd if a.startswith(key + "=")]
        assert len(vals) <= 1, (key, cmd)
        return vals[0] if vals else None

    for c in train:  # same base config and launcher for every run
        assert c[c.index("--config") + 1] == CONFIG and "--nproc_per_node=2" in c
        assert "--resume" not in c and opt(c, "optimizer.lr") == "1e-3"
        assert opt(c, "model.hf_path") is None and opt(c, "data.path") is None
    by_run = {}
    for c in train:
        by_run.setdefault(opt(c, "logging.run_dir").split("/runs/", 1)[1], c)
    assert sorted(by_run) == sorted(f"{m}/seed{s}{p}" for s in (1, 2) for m, p in
                                    (("srft", ""), ("grpo", ""), ("sft_rl", "/sft"),
                                     ("sft_rl", "/rl")))
    for run, c in by_run.items():
        method, seed = run.split("/")[0], int(run.split("/")[1][4:5])
        algo = {"sft_rl": "sft" if run.endswith("/sft") else "grpo"}.get(method, method)
        assert opt(c, "algorithm.name") == algo and opt(c, "train.seed") == str(seed)
        # SFT->RL: 2 SFT steps, then 3 GRPO steps from the SFT run's final checkpoint
        assert opt(c, "train.steps") == {"sft": "2", "grpo": "3"}.get(algo, "5") \
            if method == "sft_rl" else opt(c, "train.steps") == "5"
        if run.endswith("/rl"):
            assert opt(c, "model.load_mcore") == str(
                tmp_path / "cmp" / "runs" / "sft_rl" / f"seed{seed}" / "sft" / "checkpoints"
                / "step_000002")
        else:
            assert opt(c, "model.load_mcore") is None
    # a seed changes the prompt order, the same for every method's first run
    shuffle = {run: opt(c, "data.shuffle_seed") for run, c in by_run.items()}
    assert shuffle["srft/seed1"] == shuffle["grpo/seed1"] == shuffle["sft_rl/seed1/sft"]
    assert len({shuffle["srft/seed1"], shuffle["srft/seed2"], shuffle["sft_rl/seed1/rl"]}) == 3
    for c in evals:  # one decoding for all: temperature, samples, tokens, seed = the run's
        run = c[c.index("--model") + 1].split("/runs/", 1)[1]
        assert c[c.index("--seed") + 1] == run.split("/")[1][4:5]
        assert c[c.index("--temperature") + 1] == "0.6"
        assert c[c.index("--max-new-tokens") + 1] == "64"
        # the embedded task's shipped held-out splits, which the trainer evaluates too
        assert [a for a in c if a.startswith(("id=", "ood="))] == [
            f"{name}={path}" for name, path in embedded_eval_splits().items()]
        assert run.endswith("/rl") == run.startswith("sft_rl")


def test_runs_report_and_rerun_skips(tmp_path, capsys):
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "grpo")
    assert rc == 0 and summary["ok"] and summary["finished"] == 6 and not summary["failed"]
    assert len(fake.launched("train")) == 6 and len(fake.launched("eval")) == 6
    assert "[compare] 1/6 srft seed 1: start" in out and "[compare] 6/6 grpo seed 3: done" in out
    cmp = tmp_path / "cmp"
    for name in ("state.json", "table.md", "results.json", "logs/srft_seed1_train.log",
                 "logs/grpo_seed3_eval.log"):
        assert (cmp / name).is_file(), name
    assert sorted(os.path.basename(p) for p in summary["plots"]) == [
        "entropy.png", "eval_id_acc.png", "eval_ood_acc.png", "eval_val_acc.png",
        "truncated.png"]
    assert all(os.path.getsize(p) > 1000 for p in summary["plots"])
    state = json.loads((cmp / "state.json").read_text())
    assert state["runs"]["srft/seed2"]["status"] == "done"
    assert state["runs"]["srft/seed2"]["phases"]["train"]["attempts"] == 1
    # the same command again: nothing is launched, the same results come out
    rc2, out2, summary2, fake2 = _main(tmp_path, capsys, "--methods", "srft", "grpo")
    assert rc2 == 0 and not fake2.jobs and summary2["acc"] == summary["acc"]
    assert out2.count("finished earlier") == 6
    # a dry run over the finished comparison has nothing to do
    rc3, out3, summary3, _ = _main(tmp_path, capsys, "--methods", "srft", "grpo", "--dry-run")
    assert rc3 == 0 and summary3["commands"] == 0 and out3.count("skipped") == 6


def test_aggregation_mean_std_by_hand(tmp_path, capsys):
    assert mean_std([]) == {"n": 0, "mean": None, "std": None}
    assert mean_std([0.25]) == {"n": 1, "mean": 0.25, "std": None}
    s = mean_std([0.1, 0.2, 0.6])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(math.sqrt(0.07))
    assert pct(s) == "30.0 ± 26.5" and pct(mean_std([0.25])) == "25.0"
    rc, out, summary, _ = _main(tmp_path, capsys, "--methods", "srft", "grpo")
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    srft, grpo = results["methods"]["srft"]["splits"], results["methods"]["grpo"]["splits"]
    assert srft["id"]["mean"] == pytest.approx(0.6) and srft["id"]["std"] == pytest.approx(0.1)
    assert srft["id"]["values"] == {"1": 0.5, "2": 0.6, "3": 0.7}
    assert srft["ood"]["mean"] == pytest.approx(0.3)
    assert srft["ood"]["std"] == pytest.approx(0.264575, abs=1e-6)
    assert grpo["id"]["mean"] == pytest.approx(0.3) and grpo["id"]["std"] == pytest.approx(0.1)
    assert grpo["ood"]["std"] == pytest.approx(0.1) and grpo["ood"]["n"] == 3
    assert summary["acc"]["srft"]["id"] == pytest.approx(0.6)


def test_table_and_json_format(tmp_path, capsys):
    rc, out, summary, _ = _main(tmp_path, capsys, "--methods", "srft", "grpo")
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert table in out  # the same table on stdout
    lines = table.splitlines()
    assert lines[0].startswith("Final accuracy (%), mean ± 95 % t-interval over seeds; "
                               "srft-eval on the final policy (temperature 0.6")
    assert "4 steps x 8 prompts x 8 rollouts (SFT->RL: 2 SFT + 2 GRPO steps" in lines[0]
    # t(0.975, 2 df) = 4.303: SRFT id 0.5 0.6 0.7 -> 60.0 ± 4.303 * 0.1 / sqrt(3) = 24.8
    assert lines[2:6] == ["| method | lr | val (validation) | id | ood | truncated | seeds |",
                          "|---|---|---|---|---|---|---|",
                          "| SRFT | 0.001 | 30.0 ± 0.0 | 60.0 ± 24.8 | 30.0 ± 65.7 | 10.0 | 3/3 |",
                          "| GRPO | 0.001 | 30.0 ± 0.0 | 30.0 ± 24.8 | 10.0 ± 24.8 | 10.0 | 3/3 |"]
    # paired by seed: SRFT - GRPO on id = 0.1, 0.4, 0.4 -> +30.0 ± 4.303 * 0.1732 / sqrt(3)
    assert "| GRPO | +30.0 ± 43.0 | +20.0 ± 43.0 |" in lines
    assert "| SRFT | 4 | 30 | 100 | 130 |" in table  # the ledger (FLOPs: 6N x 130 + 2N x 100)
    assert set(summary) == {"ok", "out", "runs", "finished", "failed", "table", "results",
                            "plots", "acc", "lr"}
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results) == {"settings", "methods", "failed", "runs", "records", "selection",
                            "wall_seconds"}
    assert results["settings"]["budget"]["rollouts_per_run"] == 4 * 8 * 8
    assert results["settings"]["seeds"] == [1, 2, 3]
    assert results["settings"]["held_out"] == ["id", "ood"]
    assert results["methods"]["grpo"]["label"] == "GRPO"
    assert results["runs"]["grpo/seed1"]["acc"] == {"id": 0.4, "ood": 0.0, "val": 0.3}
    n = results["settings"]["params"]
    rec = next(r for r in results["records"] if r["method"] == "grpo" and r["seed"] == 1)
    assert rec["lr"] == 1e-3 and rec["truncation_rate"] == {"id": 0.1, "ood": 0.1, "val": 0.1}
    assert rec["ledger"]["flops"] == 6 * n * 130 + 2 * n * 100 and n > 100_000
    assert len(results["records"]) == 6


def test_resume_interrupted_run_with_checkpoint(tmp_path, capsys):
    fake = FakeLauncher(interrupt={("grpo/seed1", "train"): "checkpoint"})
    rc, out, summary, _ = _main(tmp_path, capsys, "--methods", "srft", "grpo", "--seeds", "1",
                                fake=fake)
    assert rc == 130 and summary == {"ok": False, "interrupted": True,
                                     "out": str(tmp_path / "cmp")}
    assert fake.launched() == [("srft/seed1", "train", False), ("grpo/seed1", "train", False)]
    state = json.loads((tmp_path / "cmp" / "state.json").read_text())
    assert state["runs"]["grpo/seed1"]["status"] == "interrupted"
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "grpo", "--seeds", "1")
    assert rc == 0 and summary["ok"]
    assert fake.launched() == [("grpo/seed1", "train", True)]  # srft/seed1 was finished
    assert fake.jobs[0].cmd[-1] == "--resume"
    assert "grpo seed 1: train (grpo, 4 steps): resume from step_000001" in out
    state = json.loads((tmp_path / "cmp" / "state.json").read_text())
    assert state["runs"]["grpo/seed1"]["phases"]["train"]["attempts"] == 2


def test_restart_interrupted_run_without_checkpoint(tmp_path, capsys):
    fake = FakeLauncher(interrupt={("sft_rl/seed1", "rl"): "no-checkpoint"})
    rc, *_ = _main(tmp_path, capsys, "--methods", "sft_rl", "--seeds", "1", fake=fake)
    assert rc == 130
    rl_dir = tmp_path / "cmp" / "runs" / "sft_rl" / "seed1" / "rl"
    assert (rl_dir / "metrics.jsonl").is_file() and not (rl_dir / "checkpoints").exists()
    # the stand-in asserts that the trainer meets a cleared directory (no metrics.jsonl)
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "sft_rl", "--seeds", "1")
    assert rc == 0 and summary["ok"]
    assert fake.launched() == [("sft_rl/seed1", "rl", False)]  # the SFT run was finished
    assert "--resume" not in fake.jobs[0].cmd and "rl (grpo, 2 steps, from " in out
    assert ": restart" in out
    rows = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # only the new attempt's


def test_failure_reported_others_continue(tmp_path, capsys):
    fake = FakeLauncher(fail={("grpo/seed1", "train"): 1, ("sft_rl/seed2", "sft"): 3,
                              ("srft/seed2", "eval"): 2})
    rc, out, summary, _ = _main(tmp_path, capsys, "--methods", "srft", "grpo", "sft_rl",
                                "--seeds", "1", "2", fake=fake)
    assert rc == 1 and not summary["ok"] and summary["finished"] == 3
    failed = {f["run"]: f for f in summary["failed"]}
    assert sorted(failed) == ["grpo/seed1", "sft_rl/seed2", "srft/seed2"]
    logs = tmp_path / "cmp" / "logs"
    assert failed["grpo/seed1"]["log"] == str(logs / "grpo_seed1_train.log")
    assert "something went wrong" in (logs / "grpo_seed1_train.log").read_text()
    assert failed["grpo/seed1"]["error"] == "train: trainer exit status 1"
    assert failed["sft_rl/seed2"]["log"] == str(logs / "sft_rl_seed2_sft.log")
    assert failed["srft/seed2"]["log"] == str(logs / "srft_seed2_eval.log")
    # every other run went on; a failed SFT run is not followed by its RL run
    launched = fake.launched()
    assert ("grpo/seed2", "train", False) in launched and ("sft_rl/seed1", "rl", False) in launched
    assert ("sft_rl/seed2", "rl", False) not in launched
    assert "[compare] 2/6 grpo seed 1: FAILED" in out and str(logs / "grpo_seed1_train.log") in out
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| GRPO | 0.001 | 30.0 | 20.0 | 10.0 | 10.0 | 1/2 |" in table
    assert f"- grpo/seed1: train: trainer exit status 1 (log: {logs}/grpo_seed1_train.log)" \
        in table
    # a re-run retries only the failed ones: the failed eval alone, the failed trainings fresh
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "grpo", "sft_rl",
                                   "--seeds", "1", "2")
    assert rc == 0 and summary["finished"] == 6
    assert sorted(fake.launched()) == [("grpo/seed1", "train", False),
                                       ("sft_rl/seed2", "rl", False),
                                       ("sft_rl/seed2", "sft", False)]
    assert fake.launched("eval") == [("grpo/seed1", "eval", False), ("srft/seed2", "eval", False),
                                     ("sft_rl/seed2", "eval", False)]


def test_trainer_final_eval_and_sft_rl_curves(tmp_path, capsys):
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "sft_rl", "--seeds",
                                   "1", "--final-eval", "trainer")
    assert rc == 0 and not fake.launched("eval")
    assert summary["acc"]["srft"] == {"id": pytest.approx(0.45), "ood": pytest.approx(0.1),
                                      "val": pytest.approx(0.3)}
    assert "the trainer's evaluation at the final step" in out
    # SFT->RL's curve: the RL run continues the SFT run's steps, its step-0 eval dropped
    plan = build_plan(parse_args(["--config", CONFIG, "--out",
                                  str(tmp_path / "cmp"), "--steps", "4",
                                  "--methods", "sft_rl", "--seeds", "1"]))
    rows = run_curves(plan.runs[0])
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    steps, mean, std = mean_curve([rows, rows], "eval/id/acc")
    assert steps == [0, 2, 4] and std == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("argv, message", [
    (["train.seed=5"], "srft-compare sets train.seed"),
    (["--methods", "srft", "ppo"], "--methods: unknown ['ppo']"),
    (["--steps", "1", "--methods", "sft_rl"], "--steps 1: need at least 2"),
    (["--final-eval", "trainer", "eval.every=0"], "needs the trainer's evaluation"),
    (["data.path=x.jsonl"], "no held-out splits"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), *argv],
              job_fn=FakeLauncher())
    captured = capsys.readouterr()
    assert rc == 2 and message in captured.err
    assert json.loads(captured.out.splitlines()[-1])["ok"] is False


def test_other_settings_refused(tmp_path, capsys):
    assert _main(tmp_path, capsys, "--methods", "grpo", "--seeds", "1", "optimizer.lr=1e-3",
                 "eval.limit=8")[0] == 0
    for argv in (["--steps", "6", "optimizer.lr=1e-3", "eval.limit=8"],
                 ["--steps", "4", "optimizer.lr=2e-3", "eval.limit=8"]):
        rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--methods",
                   "grpo", "--seeds", "1", *argv], job_fn=FakeLauncher())
        err = capsys.readouterr().err
        assert rc == 2 and "holds a comparison made with other settings" in err
    # the same values (overrides in another order), more seeds: the comparison is extended
    rc, out, summary, fake = _main(tmp_path, capsys, "eval.limit=8", "--methods", "grpo",
                                   "optimizer.lr=0.001", "--seeds", "1", "2")
    assert rc == 0 and fake.launched() == [("grpo/seed2", "train", False)]


# --------------------------------------------------------------------------- real launches
def _generations(run_dir, step):
    """{split: [greedy response per problem]} of the run's evaluation at ``step``."""
    out = {}
    for split in ("id", "ood"):
        path = os.path.join(run_dir, "eval", f"step_{step:06d}", f"{split}.jsonl")
        with open(path) as f:
            out[split] = [json.loads(line)["response"] for line in f]
    return out


@pytest.mark.slow
def test_sft_then_grpo_hands_off_for_real(tmp_path, capsys, sglang_url):
    """SFT->RL through srft-compare with real trainer launches (one rank each, sharing the
    session's SGLang CPU server through ``--shared-server URL``), 2 SFT steps then 2 GRPO steps, greedy evaluation of 4 problems per split at each
    run's start and end. The GRPO run must start from the SFT run's final weights: its
    step-0 generations are the SFT run's step-2 generations, not the base model's (the SFT
    run's step 0). Its steps also check the real training-inference path: unseeded rollouts
    with SGLang's log-probs against the trainer's, and TIS on them."""
    rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--steps", "4",
               "--methods", "sft_rl", "--seeds", "1", "--final-eval", "trainer",
               "train.prompts_per_step=2", "rollout.n_samples=2",
               "train.micro_batch_size=8", "data.max_response_len=32",
               "eval.every=2", "eval.limit=4", "eval.temperature=0.0",
               "logging.tensorboard=false", "checkpoint.export_hf=false",
               "rollout.seeded=false", "algorithm.tis_cap=2.0",
               "--shared-server", sglang_url, "--sft-rl-carry-optimizer",
               "--nproc-per-node", "1", "parallel.tp=1"])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    logs = tmp_path / "cmp" / "logs"
    assert rc == 0 and summary["ok"], (out[-3000:], [p.read_text()[-3000:]
                                                     for p in logs.glob("*.log")])
    run = tmp_path / "cmp" / "runs" / "sft_rl" / "seed1"
    sft, rl = str(run / "sft"), str(run / "rl")
    start = os.path.join(sft, "checkpoints", "step_000002")
    assert open(os.path.join(sft, "checkpoints", "latest")).read().strip() == "step_000002"
    rl_log = (logs / "sft_rl_seed1_rl.log").read_text()
    assert f"loaded model weights from the trainer checkpoint {start}" in rl_log
    assert f"loaded the optimizer state of {start}" in rl_log  # --sft-rl-carry-optimizer
    base, after_sft, rl_start = _generations(sft, 0), _generations(sft, 2), _generations(rl, 0)
    assert rl_start == after_sft
    assert rl_start != base  # two SFT steps changed some greedy answer (else no evidence)
    # the comparison's result is the GRPO run's last evaluation
    rows = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert summary["acc"]["sft_rl"] == {s: rows[-1][f"eval/{s}/acc"] for s in ("val", "id", "ood")}
    for r in rows[1:]:
        # SGLang's and Megatron's fp32 log-probs of the same tokens: close, not identical
        assert 0.0 < r["mismatch/logprob_abs_diff"] < 1e-3
        assert r["mismatch/logprob_abs_diff"] <= r["mismatch/logprob_abs_diff_max"] < 1e-2
        # TIS was applied, with weights exp(old - sglang) within the measured mismatch of 1
        bound = math.exp(r["mismatch/logprob_abs_diff_max"]) - 1
        assert r["tis/weight"] != 1.0 and abs(r["tis/weight"] - 1.0) <= bound


# --------------------------------------------------------------------------- the protocol
def test_lr_chosen_on_validation_then_seeds_at_the_choice(tmp_path, capsys):
    """Selection runs (seed 1, every lr), the choice per method on val, then seeds 2 and 3
    at the chosen lr; the result is made of the chosen lr's runs only."""
    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft", "grpo",
                                   "--lr-grid", "1e-3", "2e-3", "4e-3")
    assert rc == 0 and summary["ok"]
    # the stand-in's val accuracy peaks at 2e-3 for SRFT and at 1e-3 for GRPO
    assert summary["lr"] == {"srft": 2e-3, "grpo": 1e-3}
    launched = [k for k, _, _ in fake.launched()]
    assert launched[:6] == [f"{m}/lr{lr}/seed1" for lr in ("1e-03", "2e-03", "4e-03")
                            for m in ("srft", "grpo")]
    assert launched[6:] == ["srft/lr2e-03/seed2", "grpo/lr1e-03/seed2", "srft/lr2e-03/seed3",
                            "grpo/lr1e-03/seed3"]
    for job in fake.jobs:  # every launch trains at its run's lr
        assert job.kind == "eval" or f"optimizer.lr={job.run.lr!r}" in job.cmd
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(results["records"]) == 10
    assert sum(r["chosen"] for r in results["records"]) == 6
    sel = results["selection"]["srft"]
    assert sel["lr"] == 2e-3 and sel["split"] == "val" and sel["grid"]["0.004"] == pytest.approx(
        0.5 - math.log10(2))
    assert results["methods"]["srft"]["splits"]["id"]["n"] == 3
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| SRFT | **50.0** |" not in table and "| SRFT | 19.9 | **50.0** | 19.9 |" in table
    # a re-run finds everything done, and launches nothing
    rc, out, summary, fake2 = _main(tmp_path, capsys, "--methods", "srft", "grpo",
                                    "--lr-grid", "1e-3", "2e-3", "4e-3")
    assert rc == 0 and not fake2.jobs and summary["lr"] == {"srft": 2e-3, "grpo": 1e-3}


class _OnlyValidation(dict):
    """An accuracy record that fails the test when anything but the validation split is
    read from it."""

    def __getitem__(self, key):
        assert key == "val", f"the lr choice read the {key!r} split"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key == "val", f"the lr choice read the {key!r} split"
        return super().get(key, default)

    def values(self):
        raise AssertionError("the lr choice read every split")

    items = values


def test_state_reloads_runs_and_base_scores_and_refuses_other_settings(tmp_path):
    """A resumed comparison finds its finished runs and the base model's scores (not
    evaluated again); a state made with other settings is refused."""
    from srft_mcore.comparison.bookkeeping import State
    from srft_mcore.comparison.run_plan import CompareError

    plan = build_plan(parse_args(["--config", CONFIG, "--out", str(tmp_path / "cmp"),
                                  "--methods", "srft", "--seeds", "1"]))
    path = str(tmp_path / "state.json")
    first = State(path, plan.settings())
    first.run(plan.runs[0].key).update(status="done", acc={"val": 0.5})
    first.data.setdefault("base", {})["1"] = {"acc": {"val": 0.1}}
    first.save()
    again = State(path, plan.settings())
    assert again.data["base"] == {"1": {"acc": {"val": 0.1}}}
    assert again.run(plan.runs[0].key)["acc"] == {"val": 0.5}
    with pytest.raises(CompareError, match="other settings"):
        State(path, dict(plan.settings(), steps=plan.steps + 1))


def test_lr_choice_never_reads_the_held_out_splits(tmp_path):
    from srft_mcore.comparison.bookkeeping import State
    from srft_mcore.comparison.protocol import choose_lr, select_lrs

    plan = build_plan(parse_args(["--config", CONFIG, "--out", str(tmp_path / "cmp"),
                                  "--methods", "srft", "--lr-grid", "1e-3", "2e-3", "4e-3"]))
    state = State(str(tmp_path / "state.json"), plan.settings())
    # held-out accuracies that would pick 4e-3; validation picks 1e-3
    for run, (val, held_out) in zip(plan.runs, [(0.6, 0.1), (0.5, 0.2), (0.4, 0.9)]):
        state.run(run.key).update(status="done", acc=_OnlyValidation(
            val=val, id=held_out, ood=held_out))
    sel = select_lrs(plan, state)
    assert sel["srft"]["lr"] == 1e-3
    assert sel["srft"]["grid"] == {"0.001": 0.6, "0.002": 0.5, "0.004": 0.4}
    # ties go to the smaller lr; unfinished runs do not count
    assert choose_lr({1e-3: 0.5, 3e-3: 0.5, 1e-2: None}) == 1e-3
    assert choose_lr({1e-3: None}) is None


def test_intervals_and_paired_differences_by_hand():
    from srft_mcore.comparison.protocol import mean_ci, paired_difference, t975

    assert t975(2) == 4.303 and t975(100) == 1.96
    s = mean_ci([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** .5)
    assert mean_ci([0.4])["ci95"] is None and mean_ci([])["mean"] is None
    d = paired_difference({"1": 0.5, "2": 0.6, "3": 0.7, "4": 0.9}, {"1": 0.4, "2": 0.2,
                                                                      "3": 0.3})
    assert d["seeds"] == ["1", "2", "3"] and d["mean"] == pytest.approx(0.3)
    assert d["ci95"] == pytest.approx(4.303 * math.sqrt(0.03) / 3 ** .5)


def test_method_options_reach_the_launches(tmp_path, capsys):
    rc, out, _, _ = _main(tmp_path, capsys, "--methods", "sft_rl", "luffy", "srft_adv",
                          "--seeds", "1", "--sft-rl-carry-optimizer", "--luffy-demo-slot",
                          "--dry-run", steps="20")
    assert rc == 0
    cmds = [shlex.split(line) for line in out.splitlines() if "srft_mcore.training" in line]
    by_algo = {}
    for c in cmds:
        opts = dict(a.split("=", 1) for a in c if "=" in a and not a.startswith("--"))
        by_algo[opts["logging.run_dir"].rsplit("/", 2)[-2:][0] + "/" + opts["algorithm.name"]] = opts
    rl = by_algo["seed1/grpo"]
    # SFT->RL's RL run: a warm-up of a tenth of its 10 steps, the SFT run's optimizer state
    assert rl["optimizer.warmup_steps"] == "1" and rl["model.load_optimizer"] == "true"
    assert "optimizer.warmup_steps" not in by_algo["seed1/sft"]
    # LUFFY: 7 rollouts + the demonstration in a group of the config's 8
    assert by_algo["luffy/luffy"]["rollout.n_samples"] == "7"
    assert by_algo["srft_adv/srft"]["algorithm.onpolicy_form"] == "ppo"


@pytest.mark.parametrize("argv, message", [
    (["--lr-grid", "1e-3", "2e-3"], "need at least 3 positive learning rates"),
    (["--lr-grid", "1e-3", "2e-3", "x"], "learning rates are numbers"),
    (["--lr-grid", "1e-3", "2e-3", "3e-3", "optimizer.lr=1e-3"], "sets optimizer.lr"),
    (["--shared-server", "rollout.urls=[\"http://127.0.0.1:1\"]"], "sets rollout.urls"),
    (["--shared-server", "localhost:30000"], "not a URL"),
    (["--val-split", "dev"], "--val-split dev: no such split"),
    (["--sft-rl-warmup", "2"], "--sft-rl-warmup 2: must be >= 0 and below"),
])
def test_protocol_bad_input(tmp_path, capsys, argv, message):
    rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--steps", "4", *argv],
              job_fn=FakeLauncher())
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Fix:" in err
    assert not (tmp_path / "cmp" / "state.json").exists()


def test_lr_grid_needs_a_validation_split(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "demonstration": "\\boxed{2}",
                                "answer": "2"}) + "\n")
    id_split = embedded_eval_splits()["id"]
    rc = main(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--steps", "4",
               f"data.path={data}", f"eval.splits={{id: {id_split}}}",
               "--lr-grid", "1e-3", "2e-3", "3e-3"], job_fn=FakeLauncher())
    err = capsys.readouterr().err
    assert rc == 2 and "chooses each method's lr on a validation split" in err


def test_base_row_from_the_shared_server_scores(tmp_path, capsys):
    """--shared-server scores the base model once per seed: a table row, and SRFT minus base
    paired by seed."""
    from srft_mcore.comparison.bookkeeping import State
    from srft_mcore.comparison.results import aggregate, markdown_table

    rc, out, summary, fake = _main(tmp_path, capsys, "--methods", "srft")
    plan = build_plan(parse_args(["--config", CONFIG, "--out", str(tmp_path / "cmp"),
                                  "--steps", "4", "--methods", "srft"]))
    state = State(str(tmp_path / "cmp" / "state.json"), plan.settings())
    state.data["base"] = {str(s): {"acc": {"val": 0.1, "id": 0.1 * s, "ood": 0.0},
                                   "truncation_rate": {"val": 0.0, "id": 0.5, "ood": 1.0}}
                          for s in (1, 2, 3)}
    methods = aggregate(plan, state)
    assert list(methods) == ["base", "srft"]
    table = markdown_table(plan, methods, [])
    assert "| base model | - | 10.0 ± 0.0 | 20.0 ± 24.8 | 0.0 ± 0.0 | 75.0 | 3/3 |" in table
    # SRFT id 0.5 0.6 0.7 minus base 0.1 0.2 0.3: +40.0 on every seed
    assert "| base model | +40.0 ± 0.0 | +30.0 ± 65.7 |" in table


def test_variants_are_methods_with_their_own_overrides(tmp_path, capsys):
    """--variant NAME=METHOD with NAME.a.b=c words: a method of its own, run, labelled and
    recorded like the built-in ones; the shared overrides still reach every run."""
    from srft_mcore.comparison.run_plan import CompareError

    args = parse_args(["--config", CONFIG, "--out", str(tmp_path / "cmp"), "--seeds", "1",
                       "--methods", "srft", "srft_ema", "sft_bad",
                       "--variant", "srft_ema=srft", "--variant", "sft_bad=sft",
                       "srft_ema.algorithm.weight_schedule=ema", "train.prompts_per_step=4",
                       "sft_bad.data.demo_quality.wrong_fraction=0.5"])
    assert args.overrides == ["train.prompts_per_step=4"]
    plan = build_plan(args)
    over = {r.method: r.phases[0].overrides for r in plan.runs}
    assert "algorithm.weight_schedule=ema" in over["srft_ema"]
    assert "algorithm.name=srft" in over["srft_ema"]
    assert "data.demo_quality.wrong_fraction=0.5" in over["sft_bad"]
    assert "algorithm.name=sft" in over["sft_bad"]
    assert not any("weight_schedule" in o or "demo_quality" in o for o in over["srft"])
    assert all("train.prompts_per_step=4" in o for o in over.values())
    assert plan.settings()["variants"] == {
        "srft_ema": ["srft", "algorithm.weight_schedule=ema"],
        "sft_bad": ["sft", "data.demo_quality.wrong_fraction=0.5"]}
    assert [r.label for r in plan.runs if r.method == "srft_ema"] == ["srft_ema"]
    bad = [(["--variant", "srft=sft", "srft.algorithm.c_rl=1"], "new identifier"),
           (["--variant", "x=nope", "x.algorithm.c_rl=1"], "not a built-in method"),
           (["--variant", "x=srft"], "no x.a.b=c overrides"),
           (["--methods", "srft", "--variant", "y=srft", "y.algorithm.c_rl=1"],
            "not in --methods")]
    for words, match in bad:
        with pytest.raises(CompareError, match=match):
            parse_args(["--config", CONFIG, "--out", str(tmp_path / "x"), *words])


@pytest.mark.parametrize("script,methods", [
    ("entropy_schedules_tiny_cpu.sh", ["srft", "srft_ema", "srft_ema2", "srft_target",
                                       "srft_fixed"]),
    ("demo_quality_tiny_cpu.sh", ["srft", "sft", "srft_wrong25", "sft_wrong25",
                                  "srft_wrong50", "sft_wrong50"])])
def test_study_scripts_plan_their_methods(tmp_path, script, methods):
    """The two studies built on compare_tiny_cpu.sh: their dry runs plan every method at
    every lr of the grid (seed 1), each trainer config valid, into their own directory."""
    import subprocess

    out = subprocess.run(["bash", os.path.join(ROOT, "examples", script), "--dry-run"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OUT=str(tmp_path / "study")))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 3 * len(methods) and summary["out"] == str(tmp_path / "study")
    launched = [ln for ln in out.stdout.splitlines() if "srft_mcore.training" in ln]
    assert sorted({ln.split("/runs/")[-1].split("/")[0] for ln in launched}) == sorted(methods)
