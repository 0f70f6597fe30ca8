"""float16 training the Megatron way: fp16 parameters, fp32 main parameters in the optimizer,
a dynamic loss scale applied by the schedule; an overflowing step is skipped (weights, Adam
state and LR schedule untouched), the scale backs off after ``optimizer.hysteresis`` such
steps, and the scaler's state goes through a checkpoint. The embedded policy on one gloo
rank, the synthetic step of test_train_step."""
import math

import pytest
import torch

from srft_mcore.launching.local import spawn_ranks


def _params(t):
    return {n: p.detach().clone() for n, p in t.model.module.named_parameters()}


def _inner(t):
    """The one mixed-precision optimizer of the (dense-only) ChainedOptimizer."""
    (opt,) = t.optimizer.chained_optimizers
    return opt


def _main_params(t):
    return [p.detach().clone() for g in _inner(t).fp32_from_float16_groups for p in g]


def _scaler(t):
    s = _inner(t).grad_scaler
    return {"scale": float(s.scale), "growth": s._growth_tracker,
            "hysteresis": s._hysteresis_tracker}


def _overflowing(t):
    """Make the next backward passes non-finite: inf gradients into the log-probs."""
    real = t._policy_output

    def policy_output(model, mb, *args):
        out = real(model, mb, *args)  # the loss formed in the kernel, or the log-probs
        if isinstance(out, tuple) and out[0].requires_grad:
            out[0].register_hook(lambda g: torch.full_like(g, math.inf))
        return out

    t._policy_output = policy_output
    return lambda: setattr(t, "_policy_output", real)


def _fp16_rank(ckpt_dir):
    from srft_mcore.training import checkpoint as ckpt
    from test_train_step import _synthetic_step, _trainer

    over = ["model.dtype=float16", "optimizer.lr=1e-3", "train.micro_batch_size=4",
            "optimizer.initial_loss_scale=1024", "optimizer.hysteresis=2",
            "optimizer.max_consecutive_skips=2"]
    t = _trainer(over)
    seqs = _synthetic_step(t.hf["vocab_size"])
    out = {"param_dtypes": {p.dtype for p in t.model.module.parameters()},
           "main_dtypes": {p.dtype for p in _main_params(t)},
           "grad_scale_func": t.model.module.config.grad_scale_func is not None}
    # (a) a few ordinary steps
    start = _params(t)
    out["trained"] = [t.train_on(seqs) for _ in range(2)]
    out["moved"] = max((p - start[n]).abs().max().item() for n, p in _params(t).items())
    # (b) two overflowing steps: skipped; the scale halves at the second (hysteresis 2) and
    # the run goes on, since the scale is above optimizer.min_loss_scale
    before, lr_steps = _params(t), t.scheduler.num_steps
    restore = _overflowing(t)
    out["overflow"] = []
    for _ in range(2):
        rec = t.train_on(seqs)
        out["overflow"].append((rec, _scaler(t)))
    restore()
    out["unchanged"] = all(torch.equal(p, before[n]) for n, p in _params(t).items())
    out["lr_steps"] = (lr_steps, t.scheduler.num_steps)
    out["after"] = t.train_on(seqs)
    out["counters"] = (t.overflow_steps, t.skipped_total, t.skipped_in_a_row)
    # (c) the scaler's state (scale, growth and hysteresis trackers) through a checkpoint
    out["saved"] = _scaler(t)
    ckpt.save_checkpoint(ckpt_dir, 5, t.model.module, t.optimizer, {"overflow_steps": 3})
    main = _main_params(t)
    t2 = _trainer(over)
    out["fresh"] = _scaler(t2)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(ckpt_dir), t2.model.module, t2.optimizer)
    out["loaded"] = _scaler(t2)
    out["main_equal"] = all(torch.equal(a, b) for a, b in zip(main, _main_params(t2)))
    # both continue alike: the same next step, the same scale
    out["next"] = (t.train_on(seqs), t2.train_on(seqs))
    # at the smallest scale an overflow is a non-finite step: K in a row stop the run
    t.cfg.optimizer.min_loss_scale = _scaler(t)["scale"]
    _overflowing(t)
    try:
        for _ in range(3):
            t.train_on(seqs)
        out["stopped"] = None
    except Exception as e:  # noqa: BLE001
        out["stopped"] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
def test_fp16_trains_skips_overflows_and_checkpoints_the_loss_scale(tmp_path):
    out = spawn_ranks(_fp16_rank, 1, (str(tmp_path / "ckpt"),), timeout_s=300)[0]
    # (a) fp16 model parameters, fp32 main parameters, the schedule scales the loss
    assert out["param_dtypes"] == {torch.float16}
    assert out["main_dtypes"] == {torch.float32}
    assert out["grad_scale_func"]
    for rec in out["trained"]:
        assert math.isfinite(rec["loss"]) and rec["loss"] != 0
        assert rec["optim/loss_scale"] == 1024.0
        assert rec["train/skipped"] == 0 and rec["optim/overflow_steps"] == 0
        assert math.isfinite(rec["optim/grad_norm"]) and rec["optim/grad_norm"] > 0
    assert out["moved"] > 0
    # (b) overflow: skipped, weights untouched, scale halved after 2 in a row, counted
    (first, s1), (second, s2) = out["overflow"]
    assert first["train/skipped"] == second["train/skipped"] == 1.0
    assert first["optim/overflow_steps"] == 1 and second["optim/overflow_steps"] == 2
    assert first["optim/loss_scale"] == second["optim/loss_scale"] == 1024.0  # used
    assert s1["scale"] == 1024.0 and s2["scale"] == 512.0
    assert "optim/grad_norm" not in first and "optim/lr" not in first
    assert out["unchanged"]
    assert out["lr_steps"][1] == out["lr_steps"][0]  # no update, no LR-schedule step
    after = out["after"]
    assert after["train/skipped"] == 0 and after["optim/loss_scale"] == 512.0
    assert after["optim/overflow_steps"] == 2
    assert out["counters"] == (2, 2, 0)  # overflows above the smallest scale: no streak
    # (c) the checkpoint restores the scaler (one clean step since the back-off, hysteresis
    # used up) and the fp32 main parameters
    assert out["saved"] == {"scale": 512.0, "growth": 1, "hysteresis": 0}
    assert out["fresh"] == {"scale": 1024.0, "growth": 0, "hysteresis": 2}
    assert out["loaded"] == out["saved"]
    assert out["main_equal"]
    a, b = out["next"]
    assert a["loss"] == b["loss"] and a["optim/loss_scale"] == b["optim/loss_scale"] == 512.0
    assert a["optim/grad_norm"] == b["optim/grad_norm"]
    assert out["stopped"] is not None and "2 optimizer steps in a row" in out["stopped"]


@pytest.mark.parametrize("override,expect", [
    ("optimizer.min_loss_scale=0", r"optimizer.min_loss_scale=0(\.0)?: must be > 0"),
    ("optimizer.initial_loss_scale=0.5", "optimizer.initial_loss_scale=0.5: is below"),
    ("optimizer.hysteresis=0", "optimizer.hysteresis=0: must be >= 1"),
    ("optimizer.loss_scale_window=0", "optimizer.loss_scale_window=0: must be >= 1")])
def test_loss_scale_settings_are_checked(override, expect):
    from srft_mcore.config import ConfigError, load_config, validate

    validate(load_config(None, ["model.dtype=float16"]))  # the defaults pass
    with pytest.raises(ConfigError, match=expect):
        validate(load_config(None, ["model.dtype=float16", override]))
