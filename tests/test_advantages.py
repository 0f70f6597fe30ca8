"""GRPO group advantages with the demonstration in the group (arXiv 2506.19767, Eq. 7)."""
import math

import torch

from srft_mcore.algo.advantages import group_advantages


def test_demo_in_group_with_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # three rollouts, then the demonstration
    is_demo = torch.tensor([False, False, False, True])
    adv = group_advantages(rewards, torch.zeros(4), is_demo)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased, mean 0.5
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-5)


def test_mean_centring_only():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4),
                           torch.tensor([False, False, False, True]), std_norm=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_demo_outside_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    is_demo = torch.tensor([False, False, False, True])
    adv = group_advantages(rewards, torch.zeros(4), is_demo, demo_in_group=False)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    want = torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3]) / std
    assert torch.allclose(adv, want, atol=1e-5)


def test_groups_are_independent_and_equal_rewards_give_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 5, 5])  # any ids; group 7 all equal, 5 all zero
    is_demo = torch.tensor([False, False, True, False, True, False, True])
    for std_norm in (True, False):
        adv = group_advantages(rewards, groups, is_demo, std_norm=std_norm)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[[0, 1, 2, 5, 6]], torch.zeros(5))
        assert adv[3] < 0 < adv[4]
    # a single-member group, and a demonstration alone outside an all-equal group
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]),
                           torch.tensor([False, False, True]), demo_in_group=False)
    assert torch.isfinite(adv).all() and adv[0] == 0 and adv[1] == 0
    assert torch.isclose(adv[2], torch.tensor(1.0))  # centred, not divided by a zero std
