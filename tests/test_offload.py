"""Trainer state offload during colocated rollouts (rollout.offload): on real gloo ranks with
the trainer's own model and Megatron optimizer, an offload + restore between two training
steps changes nothing, bit for bit (fp32; bf16 with fp32 master weights; the distributed
optimizer over two ranks), the device storages are really freed while offloaded, and every
view Megatron keeps still aliases its buffer afterwards. Then the config key, and a
colocated (weight_sync=tensor) trainer run against a fake SGLang whose checkpoint and
metrics equal those of the same run without offload."""
import json
import math

import pytest
import torch

from srft_mcore.launching.local import spawn_ranks


# --------------------------------------------------------------------------- helpers (on a rank)
def _optimizers(t):
    from srft_mcore.training.offload import _torch_optimizers

    return _torch_optimizers(t.optimizer)


def _everything(t) -> dict:
    """Clones of every weight, gradient buffer, optimizer parameter and optimizer state
    tensor, by name (the frozen reference's weights too)."""
    out = {f"param/{n}": p.detach().clone() for n, p in t.model.module.named_parameters()}
    if t.ref_model is not None:
        out.update({f"ref/{n}": p.detach().clone() for n, p in t.ref_model.named_parameters()})
    out.update({f"grad_data/{i}": b.grad_data.clone() for i, b in enumerate(t.model.buffers)})
    for j, opt in enumerate(_optimizers(t)):
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"opt{j}/param/{g}/{i}"] = p.detach().clone()
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"opt{j}/state/{g}/{i}/{k}"] = v.clone()
    return out


def _views(t) -> list:
    """What Megatron's views hang on: each parameter's object, storage and offset into its
    buffer, its main_grad's storage and offset into grad_data, the optimizer's parameter
    objects. Equal before and after a restore iff every view still aliases its buffer."""
    (buf,) = t.model.buffers
    grad = buf.grad_data
    out = []
    for p in t.model.module.parameters():
        base = buf.param_data if buf.param_data is not None else p
        out.append((id(p), p.untyped_storage()._cdata,
                    p.untyped_storage()._cdata == base.untyped_storage()._cdata,
                    p.data_ptr() - base.data_ptr(),
                    p.main_grad.untyped_storage()._cdata == grad.untyped_storage()._cdata,
                    p.main_grad.data_ptr() - grad.data_ptr()))
    out += [id(p) for opt in _optimizers(t) for g in opt.param_groups for p in g["params"]]
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _expected_bytes(t, what: str) -> int:
    """What an offload must move, from Megatron's objects: the grad buffer, every optimizer
    state tensor, the fp32 master weights of mixed precision; ``all``: the weights (the
    distributed optimizer's flat param buffer, else each parameter) and the reference's."""
    (buf,) = t.model.buffers
    weights = {p.untyped_storage()._cdata for p in t.model.module.parameters()}
    n = _nbytes(buf.grad_data)
    for opt in _optimizers(t):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.untyped_storage()._cdata not in weights:  # a master copy, not a view
                    n += _nbytes(p)
                n += sum(_nbytes(v) for v in opt.state.get(p, {}).values() if torch.is_tensor(v))
    if what == "all":
        n += (_nbytes(buf.param_data) if buf.param_data is not None else
              sum(_nbytes(p) for p in t.model.module.parameters()))
        if t.ref_model is not None:
            n += sum(_nbytes(p) for p in t.ref_model.parameters())
    return n


def _freed(t, what: str) -> dict:
    """Whether each kind of storage is freed (nbytes 0) now."""
    (buf,) = t.model.buffers
    weights = {p.untyped_storage()._cdata for p in t.model.module.parameters()}
    opt_params = [p for opt in _optimizers(t) for g in opt.param_groups for p in g["params"]]
    masters = [p for p in opt_params if p.untyped_storage()._cdata not in weights]
    moments = [v for opt in _optimizers(t) for s in opt.state.values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq")]
    out = {"grad_data": buf.grad_data.untyped_storage().nbytes() == 0,
           "moments": bool(moments) and all(v.untyped_storage().nbytes() == 0 for v in moments),
           "masters": [p.untyped_storage().nbytes() == 0 for p in masters],
           "weights": [p.untyped_storage().nbytes() == 0 for p in t.model.module.parameters()]}
    if t.ref_model is not None:
        out["ref"] = [p.untyped_storage().nbytes() == 0 for p in t.ref_model.parameters()]
    return out


def _offload_rank(overrides, modes):
    """Per mode: a fresh trainer; offload + restore before step 1 (no Adam state yet), a
    step, offload (checked: freed, bytes) + restore (checked: exact, views kept), another
    step; the end state of each mode is compared to ``none``'s, bit for bit."""
    from srft_mcore.training.offload import StateOffloader
    from test_train_step import _synthetic_step, _trainer

    finals, facts = {}, {}
    for what in modes:
        t = _trainer(overrides)
        seqs = _synthetic_step(t.hf["vocab_size"])
        off = StateOffloader([t.model, t.ref_model], t.optimizer, what)
        f = facts[what] = {"mixed": any(
            p.untyped_storage()._cdata not in {q.untyped_storage()._cdata
                                               for q in t.model.module.parameters()}
            for opt in _optimizers(t) for g in opt.param_groups for p in g["params"])}
        off.mark("rollout")
        f["first"] = (off.offload(), _expected_bytes(t, what) if off.active else 0)
        off.mark("train")
        off.restore()
        t.train_on(seqs)
        before, views = _everything(t), _views(t)
        moved = off.offload(weights=False)  # the trainer's order: state, sync, then weights
        f["state_then_weights"] = (moved, moved + off.offload())
        f["again"] = off.offload()  # idempotent
        f["expected"] = _expected_bytes(t, what) if off.active else 0
        f["freed"] = _freed(t, what)
        # hold memory of every freed size so a restore cannot find the old blocks unchanged
        junk = [torch.full_like(v, math.nan) if v.is_floating_point() else v + 1
                for v in before.values()]
        off.mark("rollout")
        f["restored"] = off.restore()
        del junk
        after = _everything(t)
        f["exact"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        f["views_kept"] = _views(t) == views
        f["metrics"] = off.metrics()
        t.train_on(seqs)
        finals[what] = _everything(t)
    base = finals[modes[0]]
    for what in modes[1:]:
        facts[what]["differs_from_none"] = sorted(
            k for k in base.keys() | finals[what].keys()
            if k not in base or k not in finals[what] or not torch.equal(base[k],
                                                                         finals[what][k]))
    return facts


CASES = {
    # fp32: the optimizer steps the weights themselves (state = grads + moments); with a KL
    # penalty, so "all" moves the frozen reference too
    "fp32": (1, ["optimizer.lr=1e-3", "train.micro_batch_size=4", "algorithm.kl_coef=0.05"]),
    # bf16 weights, fp32 master copies in the optimizer (Float16OptimizerWithFloat16Params)
    "bf16": (1, ["model.dtype=bfloat16", "optimizer.lr=1e-3", "train.micro_batch_size=4"]),
    # the distributed optimizer over 2 DP ranks: params are views into one param buffer, the
    # optimizer holds fp32 shards
    "bf16_distopt_dp2": (2, ["model.dtype=bfloat16", "optimizer.lr=1e-3",
                             "train.micro_batch_size=2",
                             "parallel.use_distributed_optimizer=true"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_offload_and_restore_between_steps_is_bit_exact(case):
    world, overrides = CASES[case]
    for rank, facts in enumerate(spawn_ranks(_offload_rank, world,
                                             args=(overrides, ["none", "state", "all"]),
                                             timeout_s=400)):
        assert facts["none"]["first"] == (0, 0) and facts["none"]["state_then_weights"] == (0, 0)
        assert facts["none"]["freed"]["grad_data"] is False
        mixed = facts["none"]["mixed"]
        assert mixed == (case != "fp32")  # the fp32 master copies exist exactly with bf16
        for what in ("state", "all"):
            f = facts[what]
            # before step 1 there is no Adam state: the grad buffer (and master copies) move
            assert f["first"][0] == f["first"][1] > 0, (what, f["first"])
            state_only, total = f["state_then_weights"]
            assert total == f["expected"] and f["restored"] == total, (what, f)
            assert (state_only == total) == (what == "state")  # weights only once asked for
            assert f["again"] == 0
            freed = f["freed"]
            assert freed["grad_data"] and freed["moments"] and all(freed["masters"])
            assert len(freed["masters"]) > 0 if mixed else freed["masters"] == []
            assert all(freed["weights"]) if what == "all" else not any(freed["weights"])
            if "ref" in freed:
                assert all(freed["ref"]) if what == "all" else not any(freed["ref"])
            assert f["exact"] == [], (what, f["exact"][:5])  # restored bit for bit
            assert f["views_kept"], what
            assert f["differs_from_none"] == [], (what, f["differs_from_none"][:5])
            m = f["metrics"]
            assert m["offload/bytes"] == f["first"][0] + total and m["offload/seconds"] > 0
            assert m["mem/rollout_peak_gb"] > 0 and m["mem/train_peak_gb"] > 0, m
        if case == "fp32":
            assert "ref" in facts["all"]["freed"]


# --------------------------------------------------------------------------- config
def test_offload_config_auto_resolution_and_refusal():
    from srft_mcore.config import ConfigError, load_config, validate
    from srft_mcore.training.offload import StateOffloader, resolve_offload

    def cfg(*over):
        return validate(load_config(None, list(over)))

    assert cfg().rollout.offload == "auto"
    assert resolve_offload(cfg().rollout, cuda=True) == "none"  # auto sync: dedicated GPUs
    colocated = cfg("rollout.weight_sync=tensor").rollout
    assert resolve_offload(colocated, cuda=True) == "state"
    assert resolve_offload(colocated, cuda=False) == "none"
    for what in ("none", "state", "all"):  # explicit values stay, on CPU too
        assert resolve_offload(cfg("rollout.weight_sync=tensor", f"rollout.offload={what}")
                               .rollout, cuda=False) == what
    assert resolve_offload(cfg("rollout.offload=none").rollout, cuda=True) == "none"
    for sync in ("auto", "distributed", "disk"):
        with pytest.raises(ConfigError) as err:
            cfg(f"rollout.weight_sync={sync}", "rollout.offload=state")
        msg = str(err.value)
        assert msg.startswith("config error: rollout.offload='state': ")
        assert "share the trainer's GPUs" in msg and f"rollout.weight_sync={sync}" in msg
        assert "Fix: set rollout.weight_sync=tensor" in msg and "rollout.offload=none" in msg
    with pytest.raises(ConfigError, match=r"rollout\.offload='gpu'.*use one of: auto, none"):
        cfg("rollout.offload=gpu")
    with pytest.raises(ValueError, match="expected none, state or all"):
        StateOffloader([], None, "auto")


# --------------------------------------------------------------------------- a colocated run
def _colocated_run(tmp_path, fakes, offload):
    from fake_http import fake_state
    from test_faults import CONFIG, SYNC_RUN, run_trainer

    state = fake_state()
    url = fakes(state)
    run_dir = tmp_path / f"run_{offload}"
    out = run_trainer("--config", CONFIG, *SYNC_RUN, f"logging.run_dir={run_dir}",
                      "rollout.weight_sync=tensor", f'rollout.urls=["{url}"]',
                      f"rollout.offload={offload}", "checkpoint.every=1", "checkpoint.keep=5")
    assert out.returncode == 0, out.stderr[-4000:]
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return run_dir, rows, [p for p, _ in state["calls"]]


@pytest.mark.slow
def test_colocated_cpu_run_with_offload_equals_the_run_without(tmp_path, fakes):
    """weight_sync=tensor against a fake SGLang (tests/fake_http.py) on CPU: two steps with
    rollout.offload=state (step 1 saved before its state leaves, step 2 the last) give the
    checkpoints, metrics and server calls of the same run with offload none."""
    from test_faults import checkpoint_tensors
    from test_trainer import stable

    runs = {o: _colocated_run(tmp_path, fakes, o) for o in ("none", "state")}
    (dir_n, rows_n, calls_n), (dir_s, rows_s, calls_s) = runs["none"], runs["state"]
    assert [r["step"] for r in rows_s] == [1, 2]
    assert calls_s == calls_n and "/update_weights_from_tensor" in calls_s
    assert calls_s.count("/release_memory_occupation") == 2  # before each training step
    for s in (1, 2):
        a = checkpoint_tensors(dir_n / "checkpoints" / f"step_{s:06d}")
        b = checkpoint_tensors(dir_s / "checkpoints" / f"step_{s:06d}")
        assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], s

    def same(row):
        return {k: v for k, v in stable(row).items() if not k.startswith(("mem/", "offload/"))}

    assert [same(r) for r in rows_s] == [same(r) for r in rows_n]
    # the state went to the host before the first rollout and after step 1; step 2 is the
    # last: restored, nothing offloaded after it
    assert rows_n[0]["offload/bytes"] == 0 and rows_s[0]["offload/bytes"] > 0
    assert rows_s[1]["offload/bytes"] == 0 and rows_s[1]["offload/seconds"] > 0
    for r in rows_s + rows_n:
        assert r["mem/train_peak_gb"] > 0 and r["mem/rollout_peak_gb"] > 0


@pytest.mark.slow
def test_a_failed_sync_with_offloaded_state_saves_the_restored_step(tmp_path, fakes):
    """Step 1's sync fails for good after its state went to the host: the state comes back
    for the checkpoint the stop message names."""
    from fake_http import fake_state
    from test_faults import CONFIG, SYNC_RUN, checkpoint_tensors, run_trainer, stopped_paragraph

    # the sync before the first rollout works, step 1's fails
    url = fakes(fake_state(fail_after={"/update_weights_from_tensor": 1}))
    run_dir = tmp_path / "run"
    out = run_trainer("--config", CONFIG, *SYNC_RUN, f"logging.run_dir={run_dir}",
                      "rollout.weight_sync=tensor", f'rollout.urls=["{url}"]',
                      "rollout.offload=state")
    msg = stopped_paragraph(out)
    step1 = run_dir / "checkpoints" / "step_000001"
    assert msg.startswith("srft-train: step 1: the weight sync") and f"saved in {step1}" in msg
    tensors = checkpoint_tensors(step1)
    moments = [v for k, v in tensors.items() if k.startswith("optimizer.") and "exp_avg" in k]
    assert moments and all(torch.isfinite(v).all() for v in moments)
    assert any(v.abs().sum() > 0 for v in moments)  # the trained step's Adam state


