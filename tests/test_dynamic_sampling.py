"""rollout.dynamic_sampling: which groups are dropped, the resampling rounds and their cap,
short batches, the logged counts, exact resume and the overlapped (background) variant,
with a fake engine whose rewards are fixed per prompt (or per prompt, sample and seed)."""
import json
from types import SimpleNamespace

import pytest

from srft_mcore.config import ConfigError, load_config, validate
from srft_mcore.rollout.client import Completion
from srft_mcore.rollout.seeded import mix_seed
from srft_mcore.training.dynamic_sampling import collect, counts_demo, is_uniform
from srft_mcore.training.rollout_side import RolloutSide


class CountingSampler:
    """Prompts 0, 1, 2, ... in order (so rounds can be checked by hand), with a state."""

    def __init__(self):
        self.position = 0

    def next_batch(self, size=4):
        out = list(range(self.position, self.position + size))
        self.position += size
        return out

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class FakeEngine:
    """``outcome(prompt index, sample j, seed) -> bool`` (correct); records every call as
    (prompt indices, seed). ``fail_client``: the background client's first call raises."""

    def __init__(self, outcome, fail_client=False):
        self.outcome, self.calls, self.fail_client = outcome, [], fail_client
        self.client = SimpleNamespace(generate=self._client_generate)

    def generate(self, prompt_ids, n, sampling, return_logprob):
        self.calls.append(([ids[0] for ids in prompt_ids], sampling.seed))
        return [[Completion(token_ids=[1] * (1 + j), logprobs=[], finish_reason="stop",
                            text="yes" if self.outcome(ids[0], j, sampling.seed) else "no")
                 for j in range(n)] for ids in prompt_ids]

    def _client_generate(self, *args, **kwargs):
        if self.fail_client:
            self.fail_client = False
            raise RuntimeError("server went away")
        return self.generate(*args, **kwargs)

    def _check_versions(self, groups):
        pass


def make_side(overrides, outcome, sampler=None, fail_client=False, demo_reward=None):
    cfg = load_config(None, ["reward.workers=0", "rollout.n_samples=2", "rollout.seeded=true",
                             "rollout.top_p=1.0", "train.prompts_per_step=4", "train.steps=5",
                             "rollout.dynamic_sampling=true", *overrides])
    dataset = SimpleNamespace(batch=lambda idx: [SimpleNamespace(
        index=i, prompt_ids=[i], prompt=f"p{i}", answer="yes", demo_ids=[5, 6],
        demo_reward=(demo_reward or {}).get(i)) for i in idx])
    side = RolloutSide(cfg, SimpleNamespace(rank=0, cpu_group=None),
                       SimpleNamespace(eos_token_id=0), dataset,
                       sampler or CountingSampler(), lambda resp, ans, prompt: float(resp == ans))
    side.engine = FakeEngine(outcome, fail_client)
    return side


# prompt i's two rollouts by i % 4: all wrong, all right, mixed, mixed (seed-independent)
BY_FOUR = {0: (False, False), 1: (True, True), 2: (True, False), 3: (False, True)}


def by_four(i, j, seed):
    return BY_FOUR[i % 4][j]


# --------------------------------------------------------------------------- definitions
def test_uniform_groups_with_and_without_the_demonstration():
    assert is_uniform([0.0, 0.0]) and is_uniform([1.0, 1.0]) and not is_uniform([1.0, 0.0])
    # the demonstration counts as reward 1: an all-wrong group is no longer uniform
    assert not is_uniform([0.0, 0.0], 1.0) and is_uniform([1.0, 1.0], 1.0)
    assert not is_uniform([0.5, 0.5], 1.0) and is_uniform([0.5, 0.5])

    def cfg(*o):
        return load_config(None, list(o))

    assert counts_demo(cfg("algorithm.name=srft")) and counts_demo(cfg("algorithm.name=luffy"))
    assert counts_demo(cfg("algorithm.name=srft_no_wrl"))
    assert not counts_demo(cfg("algorithm.name=grpo"))
    assert not counts_demo(cfg("rollout.dynamic_sampling_count_demo=false"))


def test_config_defaults_and_refusals():
    r = load_config(None, []).rollout
    assert (r.dynamic_sampling, r.dynamic_sampling_count_demo, r.max_resample_rounds) == (
        False, None, 3)
    validate(load_config(None, ["rollout.dynamic_sampling=true", "rollout.overlap=true"]))
    validate(load_config(None, ["rollout.dynamic_sampling=true", "algorithm.name=grpo"]))
    # one rollout per prompt: fine when the demonstration counts, else every group drops
    validate(load_config(None, ["rollout.dynamic_sampling=true", "rollout.n_samples=1"]))
    refusals = [
        (["algorithm.name=sft"], r"rollout\.dynamic_sampling=True: algorithm\.name=sft trains "
                                 r"on the demonstrations only.*Fix: set rollout\.dynamic_samp"),
        (["algorithm.name=grpo", "rollout.dynamic_sampling_count_demo=true"],
         r"dynamic_sampling_count_demo=True: algorithm\.name=grpo puts no demonstration.*Fix"),
        (["algorithm.name=grpo", "rollout.n_samples=1"],
         r"rollout\.n_samples=1: with one rollout per prompt .* drop every group\. Fix"),
        (["rollout.max_resample_rounds=-1"], r"max_resample_rounds=-1: must be >= 0\. Fix"),
    ]
    for extra, message in refusals:
        with pytest.raises(ConfigError, match=message):
            validate(load_config(None, ["rollout.dynamic_sampling=true", *extra]))
    # a negative round count is refused even with dynamic sampling off
    with pytest.raises(ConfigError, match="max_resample_rounds"):
        validate(load_config(None, ["rollout.max_resample_rounds=-2"]))


# --------------------------------------------------------------------------- rounds by hand
def test_grpo_drops_all_wrong_and_all_right_groups_and_resamples_the_shortfall():
    side = make_side(["algorithm.name=grpo"], by_four)
    indices, groups, rewards = side.next_batch(0)
    # round 1: prompts 0-3, keep 2 and 3; round 2 draws the 2 missing: 4, 5 (both uniform);
    # round 3 draws 2 again: 6, 7 (kept): 4 groups after 3 rounds
    assert indices == [2, 3, 6, 7]
    assert rewards == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert [c[0] for c in side.engine.calls] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    # one rollout call per round, each with its own seed (the call count)
    assert [c[1] for c in side.engine.calls] == [mix_seed(1234, k) for k in range(3)]
    assert side.rollout_calls == 3 and side.sampler.position == 8
    m = side.dynamic_metrics()
    assert {k: m[k] for k in ("dynamic/kept", "dynamic/dropped", "dynamic/rounds",
                              "dynamic/prompts_drawn", "dynamic/padded",
                              "dynamic/dropped_solved")} == {
        "dynamic/kept": 4, "dynamic/dropped": 4, "dynamic/rounds": 3,
        "dynamic/prompts_drawn": 8, "dynamic/padded": 0, "dynamic/dropped_solved": 2}
    # the ledger counts every round: 8 prompts x (1 + 2 tokens)
    assert (m["ledger/prompts"], m["ledger/rollout_tokens"]) == (8, 24)
    assert m["dynamic/reward_mean_drawn"] == 0.5


def test_srft_counts_the_demonstration_unless_told_not_to():
    side = make_side(["algorithm.name=srft"], by_four)
    indices, _, _ = side.next_batch(0)
    # all-wrong prompt 0 is kept (its demonstration scores 1), all-right prompt 1 dropped;
    # round 2 draws 1 prompt: 4 (all wrong: kept)
    assert indices == [0, 2, 3, 4] and side.rollout_calls == 2
    m = side.dynamic_metrics()
    assert (m["dynamic/kept"], m["dynamic/dropped"], m["dynamic/rounds"],
            m["dynamic/prompts_drawn"]) == (4, 1, 2, 5)
    side = make_side(["algorithm.name=srft", "rollout.dynamic_sampling_count_demo=false"],
                     by_four)
    assert side.next_batch(0)[0] == [2, 3, 6, 7]  # as GRPO
    # data.verify_demos scored prompt 0's demonstration 0: its all-wrong group is uniform;
    # rounds: 0-3 keep 2, 3; then 4 (kept), 5; then 6 (kept)
    side = make_side(["algorithm.name=srft"], by_four, demo_reward={0: 0.0})
    assert side.next_batch(0)[0] == [2, 3, 4, 6] and side.rollout_calls == 3


def test_rounds_stop_at_the_cap_and_a_short_batch_is_padded(capsys):
    only_two = lambda i, j, seed: i == 2 and j == 0  # noqa: E731 - prompt 2 alone is mixed
    side = make_side(["algorithm.name=grpo", "rollout.max_resample_rounds=1",
                      "train.mini_batches=2"], only_two)
    indices, groups, rewards = side.next_batch(0)
    # round 1: 0-3 keeps 2; round 2 (the cap) draws 3: 4-6, none kept; 1 kept group, padded
    # with the earliest dropped one (0) to a multiple of mini_batches x dp = 2
    assert indices == [0, 2] and rewards == [[0.0, 0.0], [1.0, 0.0]]
    assert [c[0] for c in side.engine.calls] == [[0, 1, 2, 3], [4, 5, 6]]
    m = side.dynamic_metrics()
    assert (m["dynamic/kept"], m["dynamic/dropped"], m["dynamic/padded"], m["dynamic/rounds"],
            m["dynamic/prompts_drawn"]) == (1, 6, 1, 2, 7)
    assert "dynamic sampling: 1 of 4 groups kept after 2 rounds (7 prompts drawn" in \
        capsys.readouterr().out
    # no further rounds: only the first batch's filter; nothing kept: one multiple of fillers
    side = make_side(["algorithm.name=grpo", "rollout.max_resample_rounds=0",
                      "train.mini_batches=2"], lambda i, j, seed: False)
    assert side.next_batch(0)[0] == [0, 1] and side.rollout_calls == 1
    assert side.dynamic_metrics()["dynamic/kept"] == 0


@pytest.mark.parametrize("dp, mini, expect", [(1, 2, [0, 2]), (2, 2, [0, 1, 2, 3]),
                                              (2, 1, [0, 2])])
def test_short_batch_splits_into_whole_mini_batches_and_dp_shares(dp, mini, expect):
    from srft_mcore.training.batching import build_sequences, make_micro_batches, \
        split_mini_batches

    side = make_side(["algorithm.name=grpo", "rollout.max_resample_rounds=1",
                      f"train.mini_batches={mini}", f"train.prompts_per_step={4 * dp}"],
                     lambda i, j, seed: i == 2 and j == 0)
    side.cfg.parallel.dp = dp  # as validate fills it from the world size
    indices, groups, rewards = side.next_batch(0)
    assert indices[:len(expect)] == expect and len(indices) % (mini * dp) == 0
    seqs = build_sequences(side.dataset.batch(indices), groups, rewards, side.cfg.algorithm)
    parts = split_mini_batches(seqs, mini, len(indices))
    assert [len({s.group for s in p}) for p in parts] == [len(indices) // mini] * mini
    for part in parts:
        shares = [make_micro_batches(part, 1, r, dp, pad_id=0) for r in range(dp)]
        assert len({len(s) for s in shares}) == 1  # every rank runs as many micro-batches
        trained = sum(int((mb["loss_mask"].sum(-1) > 0).sum()) for s in shares for mb in s)
        assert trained == len(part)


def test_off_by_default_leaves_the_batch_and_metrics_as_before():
    side = make_side(["algorithm.name=grpo", "rollout.dynamic_sampling=false"], by_four)
    assert side.next_batch(0)[0] == [0, 1, 2, 3] and side.dynamic_metrics() == {}
    assert side.state_dict()["pending_dynamic"] == {}


# --------------------------------------------------------------------------- exact resume
def seed_dependent(i, j, seed):
    return mix_seed(i, j, seed) % 3 == 0


def real_sampler():
    from srft_mcore.data.sampler import PromptSampler

    return PromptSampler(40, 4, seed=7)


def test_positions_are_deterministic_and_a_state_round_trip_reproduces_the_next_batch():
    a = make_side(["algorithm.name=grpo"], seed_dependent, real_sampler())
    first = a.next_batch(0)
    b = make_side(["algorithm.name=grpo"], seed_dependent, real_sampler())
    assert b.next_batch(0) == first  # same rewards, same rounds, same positions
    assert (a.rollout_calls, a.sampler.state_dict()) == (b.rollout_calls, b.sampler.state_dict())
    assert a.dynamic_metrics()["dynamic/rounds"] == a.rollout_calls > 1  # it did resample
    state = json.loads(json.dumps(a.state_dict()))  # as saved with a checkpoint
    second = a.next_batch(1)
    resumed = make_side(["algorithm.name=grpo"], seed_dependent, real_sampler())
    resumed.load_state_dict(state)
    assert resumed.next_batch(1) == second
    assert resumed.engine.calls == a.engine.calls[-len(resumed.engine.calls):]
    assert resumed.dynamic_metrics() == a.dynamic_metrics()
    assert resumed.rollout_calls == a.rollout_calls
    assert resumed.sampler.state_dict() == a.sampler.state_dict()


@pytest.mark.parametrize("fail", [False, True])
def test_overlap_makes_the_same_batches_in_the_background(fail):
    """rollout.overlap: the rounds run in rank 0's background thread and make the batches
    (and positions) of a run without overlap; a failed background run is redone now."""
    plain = make_side(["algorithm.name=grpo"], seed_dependent, real_sampler())
    want, want_metrics = [], []
    for s in range(3):
        want.append(plain.next_batch(s))
        want_metrics.append(plain.dynamic_metrics())
    side = make_side(["algorithm.name=grpo", "rollout.overlap=true", "train.steps=3"],
                     seed_dependent, real_sampler(), fail_client=fail)
    got = [side.next_batch(0)]
    metrics = [side.dynamic_metrics()]
    side.finish_ahead()
    state = json.loads(json.dumps(side.state_dict()))  # the pending batch, saved
    assert state["pending_dynamic"]["dynamic/rounds"] >= 1
    got.append(side.next_batch(1))
    metrics.append(side.dynamic_metrics())
    side.finish_ahead()
    got.append(side.next_batch(2))  # the last step: nothing more ahead
    assert side.ahead is None and got == want
    assert (side.rollout_calls, side.sampler.state_dict()) == (
        plain.rollout_calls, plain.sampler.state_dict())
    assert metrics == want_metrics[:2] and metrics[1]["dynamic/rounds"] > 1
    # resuming from the state saved after step 1 trains on the pending batch, same counts
    resumed = make_side(["algorithm.name=grpo", "rollout.overlap=true", "train.steps=2"],
                        seed_dependent, real_sampler())
    resumed.load_state_dict(state)
    assert resumed.next_batch(1) == want[1] and resumed.dynamic_metrics() == metrics[1]


def test_collect_never_draws_past_the_cap_and_keeps_draw_order():
    draws, seen = iter(range(100)), []

    def draw(k):
        seen.append(k)
        return [next(draws) for _ in range(k)]

    def generate(indices):  # odd prompts informative
        return [[SimpleNamespace(token_ids=[1])] * 2 for _ in indices], \
            [[1.0, float(i % 2 == 0)] for i in indices]

    (indices, _, _), stats = collect(draw, generate, target=6, max_resample_rounds=2)
    # round 1: 0-5 keeps 1, 3, 5; round 2: 6-8 keeps 7; round 3: 9-10 keeps 9: 5 kept, short
    assert seen == [6, 3, 2] and indices == [1, 3, 5, 7, 9]
    assert (stats["dynamic/kept"], stats["dynamic/rounds"], stats["dynamic/padded"]) == (5, 3, 0)
