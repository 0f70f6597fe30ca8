"""Bad input and injected faults, tried as a user would meet them: a model directory without a
tokenizer, ``srft-doctor parity`` with a TP size that does not divide the heads, and
non-finite gradients (skip the optimizer step, count it, stop after K in a row)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

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
        [sys.executable, "-m", "srft_mcore.trainer", "--config", CONFIG, "parallel.tp=1",
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
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor", "parity", "--hf", hf_dir,
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
    import srft_mcore.batching as batching
    import srft_mcore.trainer as trainer

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
def test_nonfinite_gradients_skip_the_step_and_stop_after_k_in_a_row(tmp_path):
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
         "logging.progress_bar=false"],
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
