"""Bad input and injected faults, tried as a user would meet them: a model directory without a
tokenizer, ``srft-doctor parity`` with a TP size that does not divide the heads,
non-finite gradients (skip the optimizer step, count it, stop after K in a row), a server
that lacks a route of the weight sync (refused at start-up), and a sync that keeps failing
(the step is saved, the printed --resume command continues against a working server)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from srft_mcore.models.tiny import (EMBEDDED_MODEL_DIR, MissingTokenizer, load_tokenizer,
                                    make_tiny_hf_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "srft_tiny_cpu.yaml")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def clean_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def model_without(tmp_path, *names):
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    for name in names:
        os.remove(model / name)
    return model


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("removed, named", [
    (TOKENIZER_FILES, ["vocabulary file", "tokenizer_config.json"]),
    (("tokenizer.json",), ["vocabulary file"]),
    (("tokenizer_config.json",), ["tokenizer_config.json (the special tokens"]),
])
def test_model_dir_without_tokenizer_names_what_is_missing(tmp_path, removed, named):
    model = model_without(tmp_path, *removed)
    with pytest.raises(MissingTokenizer) as err:
        load_tokenizer(str(model))
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the trainer's one-paragraph input errors
    assert str(model) in msg
    for part in named:
        assert part in msg
    fix = msg.split("Fix: ", 1)[1]
    assert "tokenizer.json" in fix and "tokenizer_config.json" in fix and "base model" in fix
    if removed == ("tokenizer.json",):
        assert "missing tokenizer_config.json" not in msg


def test_complete_model_dir_loads_its_tokenizer():
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    assert len(tok) == 512 and tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_trainer_reports_a_missing_tokenizer_in_one_paragraph(tmp_path):
    model = model_without(tmp_path, *TOKENIZER_FILES)
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "srft_mcore.training.trainer", "--config", CONFIG, "parallel.tp=1",
         f"model.hf_path={model}", f"logging.run_dir={run_dir}", "data.template=think",
         "logging.tensorboard=false"],
        capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"model directory {model} has no usable tokenizer" in out.stderr
    assert not (run_dir / "rollout").exists()  # failed before any SGLang server


# ----------------------------------------------------------------------------- doctor parity
def test_doctor_parity_rejects_a_tp_size_that_does_not_divide_the_heads(tmp_path):
    hf_dir = make_tiny_hf_model(str(tmp_path / "h14"), hidden_size=112, num_heads=14,
                                num_kv_heads=2, num_layers=2)
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor.cli", "parity", "--hf", hf_dir,
                          "--tp", "4"], capture_output=True, text=True, timeout=300,
                         env=clean_env())
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "--tp 4 does not divide num_attention_heads (14)" in out.stderr
    assert "Fix: choose --tp from 1, 2" in out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] is False and "num_attention_heads" in res["error"]


# ----------------------------------------------------------------------------- NaN gradients
# Fault injection without touching product code: this driver counts the trainer's steps (one
# build_sequences call each) and multiplies the loss by NaN on the chosen steps, so every
# gradient of those steps is NaN; then it runs the trainer's own main().
NAN_DRIVER = textwrap.dedent('''
    import sys

    import srft_mcore.algo.losses as losses
    import srft_mcore.training.batching as batching
    import srft_mcore.training.trainer as trainer

    step = [0]
    real_build, real_make = batching.build_sequences, losses.make_loss_func


    def counting_build(*a, **k):
        step[0] += 1
        return real_build(*a, **k)


    def nan_make(*a, **k):
        loss_func = real_make(*a, **k)
        if step[0] not in NAN_STEPS:
            return loss_func
        print(f"[inject] NaN loss at step {step[0]}", flush=True)

        def nan_loss(*aa, **kk):
            loss, *rest = loss_func(*aa, **kk)
            return (loss * float("nan"), *rest)
        nan_loss.token_loss = loss_func.token_loss  # the loss formed in the kernel
        return nan_loss


    if __name__ == "__main__":  # helper processes spawned by the run re-import this file
        NAN_STEPS = {int(s) for s in sys.argv[1].split(",")}
        for module in (batching, trainer):  # wherever the trainer looks them up
            if hasattr(module, "build_sequences"):
                module.build_sequences = counting_build
        for module in (losses, trainer):
            if hasattr(module, "make_loss_func"):
                module.make_loss_func = nan_make
        sys.exit(trainer.main(sys.argv[2:]))
''')


def checkpoint_tensors(step_dir):
    """Model weights and Adam moments of one trainer checkpoint, read without ranks."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = str(step_dir) + ".pt"
    dcp_to_torch_save(os.path.join(step_dir, "mcore"), flat)
    state = torch.load(flat, weights_only=False)
    os.remove(flat)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_nonfinite_gradients_skip_the_step_and_stop_after_k_in_a_row(tmp_path, sglang_url):
    from test_trainer import attached

    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    run_dir = tmp_path / "run"
    # steps 2-3 NaN, 4 trains (the count in a row resets), 5-7 NaN: the 3rd in a row stops
    out = subprocess.run(
        [sys.executable, str(driver), "2,3,5,6,7", "--config", CONFIG, "parallel.tp=1",
         f"logging.run_dir={run_dir}", "train.steps=10", "train.prompts_per_step=4", "eval.every=0",
         "rollout.n_samples=2", "train.micro_batch_size=4", "data.max_response_len=32",
         "optimizer.max_consecutive_skips=3", "checkpoint.every=1", "checkpoint.keep=20",
         "checkpoint.export_hf=false", "logging.tensorboard=false",
         "logging.progress_bar=false", *attached(sglang_url)],
        capture_output=True, text=True, timeout=900, env=clean_env(PYTHONPATH=ROOT))
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-4000:]
    assert "[inject] NaN loss at step 7" in log, log[-4000:]
    assert "3 optimizer steps in a row had non-finite gradients" in log, log[-4000:]

    with open(run_dir / "metrics.jsonl") as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    assert set(rows) in ({1, 2, 3, 4, 5, 6}, {1, 2, 3, 4, 5, 6, 7})  # stopped at step 7
    assert [rows[s]["train/skipped"] for s in range(1, 7)] == [0, 1, 1, 0, 1, 1]
    assert [rows[s]["train/skipped_total"] for s in range(1, 7)] == [0, 1, 2, 2, 3, 4]
    assert rows[4]["optim/grad_norm"] > 0  # a NaN step leaves nothing behind

    ckpts = run_dir / "checkpoints"
    tensors = {s: checkpoint_tensors(ckpts / f"step_{s:06d}") for s in range(1, 7)}
    for s in range(2, 7):
        assert tensors[s].keys() == tensors[1].keys()
        changed = [k for k in tensors[s] if not torch.equal(tensors[s][k], tensors[s - 1][k])]
        if s == 4:  # the one trained step after the first skips moves weights and moments
            assert any(k.startswith("optimizer.") for k in changed)
            assert any(not k.startswith("optimizer.") for k in changed)
        else:  # a skipped step changes no weight and no optimizer state
            assert changed == [], (s, changed[:5])
    assert all(torch.isfinite(t).all() for t in tensors[6].values())


# ----------------------------------------------------------------------------- weight sync
# A fake SGLang (tests/fake_http.py) stands in for the server, attached by URL, so that its
# routes can be taken away or made to fail; the trainer, its model and checkpoints are real.
SYNC_RUN = ["parallel.tp=1", "train.steps=2", "train.prompts_per_step=4", "rollout.n_samples=2",
            "train.micro_batch_size=4", "data.max_response_len=32", "eval.every=0",
            "checkpoint.every=10", "checkpoint.export_hf=false", "logging.tensorboard=false",
            "logging.progress_bar=false"]


def run_trainer(*args, timeout=600, command=None):
    return subprocess.run(command or [sys.executable, "-m", "srft_mcore.training.trainer", *args],
                          capture_output=True, text=True, timeout=timeout, env=clean_env())


def posts(state):
    return [p for p, _ in state["calls"]]


def stopped_paragraph(out) -> str:
    """The run stopped with exit status 2 and no traceback; its last line (one paragraph)."""
    assert out.returncode == 2, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_server_without_the_sync_route_is_refused_before_step_1(tmp_path, fakes):
    from fake_http import ROUTES, SESSION_ROUTES, fake_state

    # SGLang 0.5.19's routes, less the one the distributed sync posts every bucket to
    state = fake_state(routes=ROUTES - set(SESSION_ROUTES) - {"/update_weights_from_distributed"},
                       sglang_version="0.5.19")
    url = fakes(state)
    run_dir = tmp_path / "run"
    out = run_trainer("--config", CONFIG, *SYNC_RUN, f"logging.run_dir={run_dir}",
                      "rollout.weight_sync=distributed", f'rollout.urls=["{url}"]')
    msg = stopped_paragraph(out)
    assert msg.startswith("srft-train: rollout.weight_sync=distributed cannot update"), msg
    assert f"{url} (SGLang 0.5.19) does not serve /update_weights_from_distributed" in msg
    assert "Fix: run SGLang 0.5.19 or 0.5.23" in msg and "rollout.weight_sync=tensor or disk" in msg
    # refused at start-up, before the model was built: no request posted, no step, no checkpoint
    assert "model build" not in out.stdout + out.stderr
    assert posts(state) == []
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_a_sync_that_fails_for_good_saves_the_step_and_resume_syncs_it_first(tmp_path, fakes):
    from fake_http import ROUTES, SESSION_ROUTES, fake_state

    plain = ROUTES - set(SESSION_ROUTES)  # SGLang 0.5.19: pause/flush/update/version/continue
    # the sync before the first rollout (an attached server holds unknown weights) works,
    # step 1's fails
    broken = fake_state(routes=plain, fail_after={"/update_weights_from_disk": 1},
                        sglang_version="0.5.19")
    bad_url = fakes(broken)
    run_dir = tmp_path / "run"
    out = run_trainer("--config", CONFIG, *SYNC_RUN, f"logging.run_dir={run_dir}",
                      "rollout.weight_sync=disk", f'rollout.urls=["{bad_url}"]')
    msg = stopped_paragraph(out)
    assert msg.startswith("srft-train: step 1: the weight sync to SGLang"), msg
    assert f"failed for good at {bad_url}/update_weights_from_disk" in msg
    assert "(attempt 3 of 3)" in msg and "injected failure" in msg
    ckpts = run_dir / "checkpoints"
    assert f"The trained step is saved in {ckpts / 'step_000001'}" in msg
    resume = f"srft-train --config {run_dir / 'config.yaml'} --resume"
    assert f"resume with: {resume} " in msg
    # step 1 was rolled out and trained, then its sync failed 3 times: saved and logged
    calls = posts(broken)
    assert calls.index("/update_weights_from_disk") < calls.index("/generate")  # at start
    first = calls.index("/generate")
    assert calls[first:].count("/update_weights_from_disk") == 3
    assert (ckpts / "latest").read_text().strip() == "step_000001"
    with open(run_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]

    # the printed command, against a working server: the saved weights go to it (version 1)
    # before the first rollout, then step 2 trains and syncs
    working = fake_state(routes=plain, sglang_version="0.5.19")
    good_url = fakes(working)
    srft_train = os.path.join(os.path.dirname(sys.executable), "srft-train")
    if not os.path.exists(srft_train):
        pytest.skip("srft-train is not installed next to this interpreter")
    out = run_trainer(command=[srft_train, *resume.split()[1:], f'rollout.urls=["{good_url}"]'])
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stdout + out.stderr
    calls = working["calls"]
    first = [p for p, _ in calls].index("/generate")
    assert [p for p, _ in calls[:first]] == [
        "/pause_generation", "/flush_cache", "/update_weights_from_disk",
        "/update_weight_version", "/continue_generation"]
    assert [v for p, v in calls if p == "/update_weight_version"] == ["1", "2"]
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    with open(run_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


@pytest.mark.slow
def test_an_attached_server_that_stops_answering_is_waited_for_then_the_run_saves_and_stops(
        tmp_path, fakes):
    """A server given by URL cannot be restarted by the trainer: it is waited for
    (rollout.reattach_timeout_s). Back in time (at step 2), it gets the weights again and
    the run goes on; not back (at step 3), the trained steps are saved and the run stops
    with one paragraph."""
    from fake_http import ROUTES, SESSION_ROUTES, fake_state

    plain = ROUTES - set(SESSION_ROUTES)
    state = fake_state(routes=plain, sglang_version="0.5.19", down_at_version=["1", "2"])
    url = fakes(state)

    def come_back_once():  # once the trainer has polled it a few times (it is waiting then)
        while state["down_polls"] < 3:
            time.sleep(0.1)
        state["down"] = False

    threading.Thread(target=come_back_once, daemon=True).start()
    run_dir = tmp_path / "run"
    out = run_trainer("--config", CONFIG, *SYNC_RUN, "train.steps=3", "rollout.weight_sync=disk",
                      "rollout.request_timeout_s=5", f"logging.run_dir={run_dir}",
                      f'rollout.urls=["{url}"]', "rollout.reattach_timeout_s=10")
    msg = stopped_paragraph(out)
    assert "waiting up to 10 s for it" in out.stdout + out.stderr
    # step 2: back, synced again (version 1 a second time), trained; step 3: gone for good
    assert [v for p, v in state["calls"] if p == "/update_weight_version"] == ["0", "1", "1",
                                                                               "2"]
    assert msg.startswith("srft-train: step 3: generating the rollouts failed for good"), msg
    assert f"server {url} stopped answering and did not come back within " \
           f"rollout.reattach_timeout_s=10 s" in msg
    ckpts = run_dir / "checkpoints"
    assert f"The trained steps are saved in {ckpts / 'step_000002'}" in msg
    assert f"resume with: srft-train --config {run_dir / 'config.yaml'} --resume" in msg
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    with open(run_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
