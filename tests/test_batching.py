"""batching.py: sequences with their group advantages (Eq. 7, demonstration in its group)
and the padded micro-batches each DP rank trains on (shifted targets, loss mask, padding).

Shape suffixes: b sequences, s positions.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from srft_mcore.algo.losses import batch_totals
from srft_mcore.training.batching import (TrainSequence, build_sequences, make_micro_batches,
                                 sequence_totals, split_mini_batches)
from srft_mcore.config import AlgorithmConfig
from srft_mcore.data import Example

PAD = 0


def algo(name="srft", **kw):
    # explicit, so the test does not depend on the per-algorithm default table
    kw.setdefault("adv_std_norm", True)
    return AlgorithmConfig(name=name, **kw)


def example(i, prompt_ids, demo_ids):
    return Example(index=i, prompt=f"p{i}", prompt_text=f"p{i}", prompt_ids=list(prompt_ids),
                   answer="0", demonstration=None if demo_ids is None else "demo",
                   demo_ids=None if demo_ids is None else list(demo_ids))


def rollout(token_ids, logprobs=None):
    return SimpleNamespace(token_ids=list(token_ids), logprobs=logprobs, text="",
                           finish_reason="stop")


def eq7(rewards):
    """Eq. 7 by hand: (r - mean) / std with the unbiased std, on plain Python floats."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / std for r in rewards]


def all_batches(seqs, mbs, dp, pad_to_multiple=1):
    return [make_micro_batches(seqs, mbs, rank, dp, PAD, pad_to_multiple=pad_to_multiple)
            for rank in range(dp)]


# ----------------------------------------------------------------------------- sequences
def test_demonstration_has_reward_one_and_joins_its_prompts_group():
    examples = [example(0, [1, 2], [30, 31]), example(1, [3, 4, 5], [40])]
    completions = [[rollout([10 + k]) for k in range(4)],
                   [rollout([20 + k, 21]) for k in range(4)]]
    rewards = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    seqs = build_sequences(examples, completions, rewards, algo())

    assert [(s.group, s.is_demo) for s in seqs] == [(0, False)] * 4 + [(0, True)] + \
        [(1, False)] * 4 + [(1, True)]
    demos = [s for s in seqs if s.is_demo]
    assert [s.reward for s in demos] == [1.0, 1.0]
    assert demos[0].tokens == [1, 2, 30, 31] and demos[0].prompt_len == 2
    # 4 wrong rollouts + the demonstration: rollouts -0.447, demonstration +1.789
    adv = [s.advantage for s in seqs]
    assert adv[:5] == pytest.approx([-0.4472136] * 4 + [1.7888544], abs=1e-5)
    assert adv[:5] == pytest.approx(eq7([0, 0, 0, 0, 1]), abs=1e-5)
    assert adv[5:] == pytest.approx(eq7([1, 0, 1, 0, 1]), abs=1e-5)


def test_demonstration_outside_the_group_keeps_its_centred_reward():
    seqs = build_sequences([example(0, [1], [9])], [[rollout([5]) for _ in range(4)]],
                           [[0.0] * 4], algo(demo_in_group=False))
    # the rollouts alone share one reward: zero advantage; the demo gets 1 - mean(0) = 1
    assert [s.advantage for s in seqs] == pytest.approx([0, 0, 0, 0, 1], abs=1e-6)


@pytest.mark.parametrize("name, rollouts, demos", [("grpo", 2, 0), ("sft", 0, 1),
                                                   ("luffy", 2, 1), ("srft", 2, 1)])
def test_each_algorithm_trains_on_its_own_sequences(name, rollouts, demos):
    seqs = build_sequences([example(0, [1], [9])], [[rollout([5]), rollout([6])]],
                           [[1.0, 0.0]], algo(name))
    assert sum(not s.is_demo for s in seqs) == rollouts
    assert sum(s.is_demo for s in seqs) == demos


def test_missing_demonstration_is_an_error_naming_the_record():
    with pytest.raises(ValueError, match="record 7"):
        build_sequences([example(7, [1], None)], [[rollout([5])]], [[1.0]], algo("srft"))


def test_empty_rollouts_are_dropped_before_the_advantage():
    completions = [[rollout([11]), rollout([]), rollout([12, 13]), rollout([14])]]
    seqs = build_sequences([example(0, [1, 2], [30])], completions, [[0.0, 1.0, 0.0, 0.0]],
                           algo())
    assert [s.tokens for s in seqs] == [[1, 2, 11], [1, 2, 12, 13], [1, 2, 14], [1, 2, 30]]
    # the empty rollout's reward (1.0) takes no part: 3 wrong + demo
    assert [s.advantage for s in seqs] == pytest.approx(eq7([0, 0, 0, 1]), abs=1e-5)
    assert [s.advantage for s in seqs] == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-5)


# ----------------------------------------------------------------------------- micro-batches
def test_loss_mask_trains_exactly_the_positions_that_predict_response_tokens():
    gen = torch.Generator().manual_seed(0)
    examples, completions = [], []
    for i in range(5):
        prompt = torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=gen)),),
                               generator=gen).tolist()
        resp = [torch.randint(50, 99, (int(torch.randint(1, 7, (1,), generator=gen)),),
                              generator=gen).tolist() for _ in range(2)]
        examples.append(example(i, prompt, [100 + i, 101 + i]))
        completions.append([rollout(r) for r in resp])
    seqs = build_sequences(examples, completions, [[1.0, 0.0]] * 5, algo())
    (batches,) = all_batches(seqs, 4, 1)
    rows = [(mb, j) for mb in batches for j in range(mb["tokens"].shape[0])]
    assert len(rows) == 16  # 15 sequences padded to a multiple of the micro-batch size
    for s, (mb, j) in zip(seqs, rows):
        tokens_s, targets_s, mask_s = mb["tokens"][j], mb["targets"][j], mb["loss_mask"][j]
        n = len(s.tokens)
        assert tokens_s[:n].tolist() == s.tokens
        assert (tokens_s[n:] == PAD).all()
        assert torch.equal(targets_s[:n - 1], tokens_s[1:n])  # position p predicts p+1
        for p in range(tokens_s.shape[0]):
            trained = p + 1 < n and p + 1 >= s.prompt_len  # token p+1 is a response token
            assert mask_s[p].item() == float(trained), (s.tokens, s.prompt_len, p)
        assert mask_s.sum().item() == n - s.prompt_len


def test_dp_padding_is_masked_and_each_sequence_lands_on_one_rank():
    examples = [example(i, [1, 2 + i], [60 + i]) for i in range(3)]
    completions = [[rollout([10 * i + 3]), rollout([10 * i + 4, 7, 8])] for i in range(3)]
    seqs = build_sequences(examples, completions, [[1.0, 0.0]] * 3, algo())
    assert len(seqs) == 9
    per_rank = all_batches(seqs, 2, 2, pad_to_multiple=4)
    # 9 sequences -> 12 (a multiple of micro_batch_size * dp): 3 micro-batches per rank
    assert [len(b) for b in per_rank] == [3, 3]
    seen, pads = [], 0
    for batches in per_rank:
        for mb in batches:
            assert mb["tokens"].shape == (2, 8)  # longest sequence (5) up to a multiple of 4
            for j in range(mb["tokens"].shape[0]):
                if mb["loss_mask"][j].sum() == 0:
                    pads += 1
                    assert mb["rewards"][j] == 0 and mb["advantages"][j] == 0
                    assert not mb["is_demo"][j]
                    continue
                n = int(mb["loss_mask"][j].nonzero().max()) + 2
                seen.append(tuple(mb["tokens"][j, :n].tolist()))
    assert pads == 3
    assert sorted(seen) == sorted(tuple(s.tokens) for s in seqs)  # each exactly once


def test_two_sequences_token_by_token():
    ex = example(0, [5, 6, 7], [10, 11, 12])
    seqs = build_sequences([ex], [[rollout([8, 9])]], [[0.0]], algo())
    (batches,) = all_batches(seqs, 2, 1)
    assert len(batches) == 1
    mb = batches[0]
    a = 1 / math.sqrt(2)  # rewards 0 and 1: mean 0.5, unbiased std sqrt(0.5)
    assert mb["tokens"].tolist() == [[5, 6, 7, 8, 9, PAD], [5, 6, 7, 10, 11, 12]]
    assert mb["targets"].tolist() == [[6, 7, 8, 9, PAD, PAD], [6, 7, 10, 11, 12, PAD]]
    assert mb["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert mb["position_ids"].tolist() == [list(range(6))] * 2
    assert mb["is_demo"].tolist() == [False, True]
    assert mb["advantages"].tolist() == pytest.approx([-a, a], abs=1e-5)
    assert mb["rewards"].tolist() == [0.0, 1.0]
    assert mb["loss_mask"].dtype.is_floating_point
    assert mb["tokens"].dtype == mb["targets"].dtype == torch.long


def test_rollout_logprobs_sit_on_the_positions_that_predict_their_tokens():
    ex = example(0, [5, 6], [10])
    comps = [rollout([8, 9, 3], logprobs=[-0.5, -1.0, -2.0]),
             rollout([8, 9], logprobs=[-0.5, None])]  # incomplete: not usable
    (batches,) = all_batches(build_sequences([ex], [comps], [[1.0, 0.0]], algo()), 4, 1)
    mb = batches[0]
    assert mb["rollout_logprobs"].shape == mb["rollout_logprob_mask"].shape == (4, 5)
    assert mb["rollout_logprobs"][0].tolist() == [0.0, -0.5, -1.0, -2.0, 0.0]
    assert mb["rollout_logprob_mask"][0].tolist() == [0, 1, 1, 1, 0]
    assert mb["rollout_logprob_mask"][1].sum() == 0  # the incomplete one
    assert mb["rollout_logprob_mask"][2].sum() == 0  # the demonstration
    assert mb["rollout_logprob_mask"][3].sum() == 0  # count padding


def test_no_sequences_is_an_error():
    with pytest.raises(ValueError, match="no sequences"):
        make_micro_batches([], 2, 0, 1, PAD)


# ----------------------------------------------------------------------------- mini-batches
def _groups(parts):
    return [[s.group for s in part] for part in parts]


def test_split_mini_batches_keeps_whole_groups_and_their_advantages():
    # group sizes 3, 2, 3, 3 (an empty rollout of prompt 1 is dropped): a split by position
    # would cut a group in two
    examples = [example(i, [1, 2 + i], [60 + i]) for i in range(4)]
    completions = [[rollout([10 * i + 3]), rollout([10 * i + 4, 7] if i != 1 else [])]
                   for i in range(4)]
    rewards = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]
    seqs = build_sequences(examples, completions, rewards, algo())
    assert _groups([seqs]) == [[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]]
    advantage = {id(s): s.advantage for s in seqs}

    halves = split_mini_batches(seqs, 2)
    assert _groups(halves) == [[0, 0, 0, 1, 1], [2, 2, 2, 3, 3, 3]]
    assert [s for part in halves for s in part] == seqs  # each sequence once, in order
    # whole groups: every sequence keeps the advantage of its complete group (Eq. 7)
    assert [s.advantage for part in halves for s in part] == [advantage[id(s)] for s in seqs]
    # prompt 1: its empty rollout dropped before the advantage, one wrong rollout + the demo
    assert [s.advantage for s in halves[0][3:]] == pytest.approx(eq7([0, 1]), abs=1e-5)
    assert _groups(split_mini_batches(seqs, 4)) == [[0, 0, 0], [1, 1], [2, 2, 2], [3, 3, 3]]

    # groups in any order: each mini-batch takes its groups, in their order in the step
    shuffled = seqs[::-1]
    assert _groups(split_mini_batches(shuffled, 2)) == [[1, 1, 0, 0, 0], [3, 3, 3, 2, 2, 2]]

    one = split_mini_batches(seqs, 1)
    assert one == [seqs] and one[0] is not seqs  # a copy: the caller's list stays its own

    # the trainer rounds the group count up to a multiple of n: 3 groups in 2 mini-batches
    three = [s for s in seqs if s.group < 3]
    assert _groups(split_mini_batches(three, 2, n_groups=4)) == [[0, 0, 0, 1, 1], [2, 2, 2]]
    with pytest.raises(ValueError, match="3 prompt groups cannot be split into 2"):
        split_mini_batches(three, 2)


def test_sequence_totals_by_hand_and_as_the_micro_batches_count_them():
    seqs = [TrainSequence([1, 2, 3, 4, 5], 2, False, 1.0, 0),   # 3 rollout tokens
            TrainSequence([1, 2, 6], 2, False, 0.0, 0),         # 1 rollout token
            TrainSequence([1, 2], 2, False, 0.0, 0),            # no response: no sequence
            TrainSequence([1, 2, 7, 8], 2, True, 1.0, 0),       # 2 demonstration tokens
            TrainSequence([9, 9, 9, 7, 8, 6, 5], 3, True, 1.0, 1),  # 4 demonstration tokens
            TrainSequence([9, 9, 9, 3], 3, False, 1.0, 1)]      # 1 rollout token
    t = sequence_totals(seqs, max_len=16, batch_entropy=0.75)
    assert (t.demo_tokens, t.rollout_tokens, t.demo_seqs, t.rollout_seqs) == (6.0, 5.0, 2.0, 3.0)
    assert (t.max_len, t.batch_entropy) == (16, 0.75)
    # the same counts as the loss masks of the micro-batches every rank trains on
    for mbs, dp, max_tokens in ((2, 1, None), (1, 2, None), (4, 2, None), (1, 1, 8),
                                (1, 2, 9)):
        masks, demo = [], []
        for rank in range(dp):
            for mb in make_micro_batches(seqs, mbs, rank, dp, PAD, max_tokens=max_tokens):
                for r in range(mb["tokens"].shape[0]):  # each sequence of each row
                    for k in mb["seq_ids"][r].unique().tolist():
                        if k < 0:
                            continue
                        masks.append(mb["loss_mask"][r] * (mb["seq_ids"][r] == k))
                        demo.append(bool(mb["is_demo"][k]))
        width = max(m.shape[0] for m in masks)
        stacked = torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[0]))
                               for m in masks])
        b = batch_totals(stacked, torch.tensor(demo), max_len=16, batch_entropy=0.75)
        assert b == t, (mbs, dp, max_tokens)
