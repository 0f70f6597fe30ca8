"""The entropy-weight schedules (algorithm.weight_schedule) on hand-computed steps, their
validation, and the schedule in a real training step (once per step, every mini-batch)."""
import copy
import json
import math

import pytest

from srft_mcore.algo.weight_schedule import (decay, schedule_metrics, schedule_step,
                                             target_range)
from srft_mcore.config import AlgorithmConfig, ConfigError, load_config, validate

E = math.exp


def run(cfg, entropies, state=None):
    """(weights, state) after each step of ``entropies``."""
    state, out = state or {}, []
    for h in entropies:
        w, state = schedule_step(state, h, cfg)
        out.append((w, state))
    return out


def test_exp_is_the_papers_weights_with_no_state():
    w, state = schedule_step({}, 0.7, AlgorithmConfig())
    assert w is None and state == {} and schedule_metrics(w, state) == {}


def test_fixed_is_both_weights_at_fixed_weight():
    (w, state), = run(AlgorithmConfig(weight_schedule="fixed", fixed_weight=0.7), [3.0])
    assert (w.w_sft, w.w_rl, w.h_eff) == (0.7, 0.7, None)
    assert schedule_metrics(w, state) == {"schedule/w_sft": 0.7, "schedule/w_rl": 0.7}


def test_ema_by_hand():
    assert decay(1.0) == 0.5 and decay(2.0) == pytest.approx(math.sqrt(0.5))
    cfg = AlgorithmConfig(weight_schedule="ema", entropy_ema_halflife=1.0)  # a = 0.5
    steps = run(cfg, [1.0, 0.0, 2.0])
    # h_1 = H_1 = 1; h_2 = 0.5 * 1 + 0.5 * 0 = 0.5; h_3 = 0.5 * 0.5 + 0.5 * 2 = 1.25
    for (w, state), h in zip(steps, [1.0, 0.5, 1.25]):
        assert state == {"schedule": "ema", "h_ema": h}
        assert w.w_sft == pytest.approx(0.5 * E(-h)) and w.w_rl == pytest.approx(0.1 * E(h))
    assert schedule_metrics(*steps[-1]) == pytest.approx(
        {"schedule/w_sft": 0.5 * E(-1.25), "schedule/w_rl": 0.1 * E(1.25),
         "schedule/h_eff": 1.25, "schedule/h_ema": 1.25})
    # the paper's sign switch applies: w_SFT = c_sft exp(+h)
    (w, _), = run(AlgorithmConfig(weight_schedule="ema", sft_entropy_sign=1.0), [1.0])
    assert w.w_sft == pytest.approx(0.5 * E(1.0))
    # a tiny half-life is the step's own entropy: exp's batch mode
    (_, _), (w, _) = run(AlgorithmConfig(weight_schedule="ema", entropy_ema_halflife=1e-9),
                         [1.0, 0.3])
    assert w.w_rl == pytest.approx(0.1 * E(0.3))


def test_ema2_by_hand():
    cfg = AlgorithmConfig(weight_schedule="ema2", entropy_ema_halflife=1.0,
                          entropy_ema_slow_halflife=2.0, entropy_trend_gain=2.0)
    s = math.sqrt(0.5)  # the slow decay
    steps = run(cfg, [1.0, 0.0, 0.0])
    # step 1: both averages start at 1, h_eff = 1
    # step 2: fast 0.5, slow s; h_eff = s + 2 (0.5 - s) = 1 - s (below the fast 0.5: the
    #         entropy is falling, so more SFT and less RL than ema's fast average gives)
    # step 3: fast 0.25, slow s * s = 0.5; h_eff = 0.5 + 2 (0.25 - 0.5) = 0
    want = [(1.0, 1.0, 1.0), (0.5, s, 1 - s), (0.25, 0.5, 0.0)]
    for (w, state), (fast, slow, h) in zip(steps, want):
        assert state["h_fast"] == pytest.approx(fast) and state["h_slow"] == pytest.approx(slow)
        assert w.h_eff == pytest.approx(h, abs=1e-12)
        assert w.w_sft == pytest.approx(0.5 * E(-h)) and w.w_rl == pytest.approx(0.1 * E(h))
    assert steps[1][0].w_sft > 0.5 * E(-0.5)  # more SFT than the fast average alone
    assert set(schedule_metrics(*steps[-1])) == {"schedule/w_sft", "schedule/w_rl",
                                                 "schedule/h_eff", "schedule/h_fast",
                                                 "schedule/h_slow"}
    # bounded: a steep gain drives h_eff to 0.5 + 10 (0.25 - 0.5) = -2 at step 3;
    # w_SFT = 0.5 e^2 = 3.69 is clamped to weight_max, w_RL = 0.1 e^-2 = 0.0135 is inside
    steep = AlgorithmConfig(weight_schedule="ema2", entropy_ema_halflife=1.0,
                            entropy_ema_slow_halflife=2.0, entropy_trend_gain=10.0,
                            weight_min=0.01, weight_max=1.0)
    w, _ = run(steep, [1.0, 0.0, 0.0])[-1]
    assert w.h_eff == pytest.approx(-2.0) and w.w_sft == 1.0
    assert w.w_rl == pytest.approx(0.1 * E(-2.0))


def test_target_by_hand():
    cfg = AlgorithmConfig(weight_schedule="target", target_entropy=1.0, target_gain=0.5)
    steps = run(cfg, [0.6, 0.6, 1.0])
    # h_eff_0 = 1 (the target); H = 0.6 is 0.4 below it: h_eff 1 - 0.2 = 0.8, then 0.6,
    # then H at the target: no move
    for (w, state), h in zip(steps, [0.8, 0.6, 0.6]):
        assert state == {"schedule": "target", "h_eff": pytest.approx(h)}
        assert w.w_rl == pytest.approx(0.1 * E(h)) and w.w_sft == pytest.approx(0.5 * E(-h))
        assert w.w_sft * w.w_rl == pytest.approx(0.05)  # Eq. 8 x Eq. 12: c_sft c_rl
    # entropy below the target: less RL on positives, more SFT than at the target
    assert steps[0][0].w_rl < 0.1 * E(1.0) < 0.5 and steps[0][0].w_sft > 0.5 * E(-1.0)


def test_target_null_holds_the_first_steps_entropy():
    """target_entropy null: the first step's entropy is the target (kept in the state, so a
    resumed run holds the same one): step 1 at it, then the controller moves from there."""
    cfg = AlgorithmConfig(weight_schedule="target", target_gain=0.5)
    steps = run(cfg, [0.8, 0.6, 1.0])
    # target 0.8: h_eff 0.8 (no move at the target), 0.8 - 0.1 = 0.7, 0.7 + 0.1 = 0.8
    for (w, state), h in zip(steps, [0.8, 0.7, 0.8]):
        assert state == {"schedule": "target", "h_eff": pytest.approx(h),
                         "target": pytest.approx(0.8)}
        assert w.w_rl == pytest.approx(0.1 * E(h)) and w.w_sft == pytest.approx(0.5 * E(-h))


def test_target_is_bounded_without_wind_up():
    cfg = AlgorithmConfig(weight_schedule="target", target_entropy=1.0, target_gain=10.0,
                          weight_min=0.01, weight_max=1.0)
    lo, hi = target_range(cfg)
    assert (lo, hi) == (pytest.approx(math.log(0.1)), pytest.approx(math.log(10.0)))
    (w1, s1), (w2, s2), (w3, s3) = run(cfg, [0.0, 0.0, 2.0])
    # 1 + 10 (0 - 1) = -9 stops at lo: w_RL = 0.01, w_SFT = 0.5 * 10 = 5 clamped to 1
    assert s1["h_eff"] == lo and w1.w_rl == pytest.approx(0.01) and w1.w_sft == 1.0
    assert s2["h_eff"] == lo  # still at the bound, not below it
    # one step above the target leaves the bound at once: lo + 10 = 7.7 -> hi, w_RL = 1
    assert s3["h_eff"] == hi and w3.w_rl == pytest.approx(1.0)
    assert w3.w_sft == pytest.approx(0.5 * 0.1 / 1.0)


def test_state_is_pure_json_and_resumes_exactly():
    cfg = AlgorithmConfig(weight_schedule="ema2", entropy_ema_halflife=3.0,
                          entropy_ema_slow_halflife=7.0)
    hs = [0.91, 0.77, 0.64, 0.70, 0.52]
    straight = run(cfg, hs)
    _, at2 = straight[1]
    frozen = copy.deepcopy(at2)
    resumed = run(cfg, hs[2:], state=json.loads(json.dumps(at2)))  # trainer_state.json
    assert at2 == frozen  # schedule_step does not modify its input
    for (a, sa), (b, sb) in zip(straight[2:], resumed):
        assert a == b and sa == sb  # bit for bit
    # a state of another schedule (the resume changed it) starts this one afresh
    (w, state), = run(AlgorithmConfig(weight_schedule="ema"), [0.4], state=at2)
    assert state == {"schedule": "ema", "h_ema": 0.4}
    # a non-finite step entropy (a step without trained tokens) keeps the state
    for c in (cfg, AlgorithmConfig(weight_schedule="target", target_entropy=1.0)):
        _, s = run(c, [0.5])[0]
        assert run(c, [math.nan], state=s)[0][1] == s


@pytest.mark.parametrize("overrides,key,fix", [
    (["algorithm.weight_schedule=cosine"], "algorithm.weight_schedule='cosine'", "use one of"),
    (["algorithm.weight_schedule=ema", "algorithm.entropy_ema_halflife=0"],
     "algorithm.entropy_ema_halflife=0", "half-life"),
    (["algorithm.weight_schedule=ema2", "algorithm.entropy_ema_slow_halflife=-1"],
     "algorithm.entropy_ema_slow_halflife=-1", "half-life"),
    (["algorithm.weight_schedule=ema2", "algorithm.entropy_ema_halflife=60"],
     "algorithm.entropy_ema_slow_halflife=50.0", "entropy_ema_slow_halflife=50"),
    (["algorithm.weight_schedule=ema2", "algorithm.entropy_trend_gain=-1"],
     "algorithm.entropy_trend_gain=-1", "2.0"),
    (["algorithm.weight_schedule=target", "algorithm.target_entropy=0.5",
      "algorithm.target_gain=-0.1"], "algorithm.target_gain=-0.1", "0.2"),
    (["algorithm.weight_schedule=target", "algorithm.target_entropy=0.5",
      "algorithm.weight_min=0.5", "algorithm.weight_max=0.2"], "algorithm.weight_max=0.2",
     "weight_min=0.01 weight_max=1.0"),
    (["algorithm.weight_schedule=ema2", "algorithm.weight_min=-1"], "algorithm.weight_min=-1",
     "0.01"),
    (["algorithm.weight_schedule=ema", "algorithm.name=grpo"],
     "algorithm.weight_schedule='ema'", "weight_schedule=exp"),
    (["algorithm.weight_schedule=fixed", "algorithm.name=luffy"],
     "algorithm.weight_schedule='fixed'", "an srft algorithm"),
    (["algorithm.weight_schedule=target", "algorithm.target_entropy=0.5", "algorithm.name=sft"],
     "algorithm.weight_schedule='target'", "weight_schedule=exp"),
    (["algorithm.weight_schedule=ema", "algorithm.entropy_weighting=token"],
     "algorithm.entropy_weighting='token'", "entropy_weighting=batch"),
])
def test_bad_schedule_settings_name_key_value_and_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides))
    msg = str(e.value)
    assert key in msg and "Fix:" in msg and fix in msg.split("Fix:")[1], msg


def test_good_schedule_settings_validate():
    for over in (["algorithm.weight_schedule=ema"], ["algorithm.weight_schedule=ema2"],
                 ["algorithm.weight_schedule=target", "algorithm.target_entropy=0.4"],
                 ["algorithm.weight_schedule=fixed", "algorithm.entropy_weighting=token"],
                 ["algorithm.weight_schedule=ema", "algorithm.name=srft_no_wsft"],
                 ["algorithm.name=grpo"]):
        validate(load_config(None, over))


# --------------------------------------------------------------------------- in a step
def _schedule_rank():
    """Two steps of ``target`` with two mini-batches each: the weights the loss used
    (``w_sft``, ``w_rl``) and the logged schedule against the hand controller from each
    step's entropy."""
    from test_train_step import _synthetic_step, _trainer

    t = _trainer(["train.mini_batches=2", "train.micro_batch_size=4", "optimizer.lr=0.05",
                  "algorithm.weight_schedule=target", "algorithm.target_entropy=1.0",
                  "algorithm.target_gain=0.5"])
    seqs = _synthetic_step(t.hf["vocab_size"])
    records = [t.train_on(seqs), t.train_on(seqs)]
    return {"records": records, "state": t.weight_state}


@pytest.mark.slow
def test_the_schedule_weights_every_mini_batch_and_moves_once_per_step():
    from srft_mcore.launching.local import spawn_ranks

    out = spawn_ranks(_schedule_rank, 1, timeout_s=300)[0]
    h_eff = 1.0
    lo, hi = math.log(0.1), math.log(10.0)
    for rec in out["records"]:
        h_eff = min(max(h_eff + 0.5 * (rec["entropy/step"] - 1.0), lo), hi)  # once per step
        w_sft, w_rl = min(max(0.5 * E(-h_eff), 0.01), 1.0), 0.1 * E(h_eff)
        assert rec["schedule/h_eff"] == pytest.approx(h_eff, rel=1e-12)
        assert rec["schedule/w_sft"] == pytest.approx(w_sft, rel=1e-12)
        assert rec["schedule/w_rl"] == pytest.approx(w_rl, rel=1e-12)
        # the loss's weights on every demonstration / positive rollout token (float32)
        assert rec["w_sft"] == pytest.approx(w_sft, rel=1e-6)
        assert rec["w_rl"] == pytest.approx(w_rl, rel=1e-6)
        assert rec["entropy/rollout_pos"] > 0 and rec["entropy/rollout_neg"] > 0
    assert out["state"] == {"schedule": "target", "h_eff": pytest.approx(h_eff, rel=1e-12)}
    assert out["records"][0]["entropy/step"] != out["records"][1]["entropy/step"]
