"""Dynamic sampling (DAPO, arXiv 2503.14476 section 3.2): groups whose rollouts all share
one reward carry no group-relative advantage, so they are dropped and more prompts are drawn
until the step has ``train.prompts_per_step`` kept groups or ``rollout.max_resample_rounds``
further rounds were spent.

A group is *uniform* (dropped) when its rewards are all equal; with the demonstration
counted (``rollout.dynamic_sampling_count_demo``, default on for the algorithms that train
the demonstration through its group advantage: luffy and the srft variants) its reward
joins the group's for that test. That reward is 1 (or its score under ``data.verify_demos``,
as training/batching.py counts it): only groups whose rollouts all score 1 are dropped, an
all-wrong group is kept because its demonstration's advantage (and with
``algorithm.demo_in_group`` the rollouts') is not zero.

Each round draws exactly the shortfall (the first: the whole batch) as one rollout call with
its own seed, so the sampler position and the call count after a step follow from the
rewards alone: a resumed run with seeded rollouts regenerates the same rounds. A batch still
short after the last round trains on every kept group plus the earliest dropped groups
needed to reach a multiple of ``train.mini_batches`` x the DP size (at least one), so every
optimizer mini-batch holds the same number of whole groups and every DP rank the same
number of them (those fillers add no advantage, only their demonstrations' SFT term).

Torch-free: the config validation imports it.
"""
from __future__ import annotations

from typing import Callable, Optional

DEMO_GROUP_ALGORITHMS = ("luffy", "srft", "srft_no_wsft", "srft_no_wrl")
"""Algorithms whose demonstration joins its prompt's group (advantage, off-policy term)."""

DEMO_REWARD = 1.0
"""The reward a demonstration counts with (as in training/batching.py) unless
data.verify_demos scored it (``Example.demo_reward``)."""


def demo_reward_of(example) -> float:
    """The reward ``example``'s demonstration has in its group."""
    value = getattr(example, "demo_reward", None)
    return DEMO_REWARD if value is None else float(value)


def counts_demo(cfg) -> bool:
    """``rollout.dynamic_sampling_count_demo`` resolved: null = on for the algorithms of
    :data:`DEMO_GROUP_ALGORITHMS`, off otherwise."""
    value = cfg.rollout.dynamic_sampling_count_demo
    return cfg.algorithm.name in DEMO_GROUP_ALGORITHMS if value is None else bool(value)


def is_uniform(rewards, demo_reward: Optional[float] = None) -> bool:
    """The group's rewards (and ``demo_reward``, when the demonstration counts) are all one
    value: exact equality, the rewards being the reward function's own numbers."""
    values = list(rewards) + ([] if demo_reward is None else [demo_reward])
    return len(set(float(v) for v in values)) <= 1


def collect(draw: Callable, generate: Callable, target: int, max_resample_rounds: int,
            multiple: int = 1, demo_rewards: Optional[Callable] = None, log=None) -> tuple:
    """Rounds of ``draw(k)`` (k prompt indices) and ``generate(indices)`` (their completion
    groups and rewards) until ``target`` groups are kept or ``1 + max_resample_rounds``
    rounds ran. Returns ``((indices, groups, rewards), stats)``: the kept groups (padded as
    the module says, to a multiple of ``multiple``) in draw order, and the ``dynamic/*``
    metrics. ``demo_rewards(indices)``: the demonstrations' rewards when they count."""
    drawn = []  # (index, group, rewards, kept) in draw order
    rounds, n_kept = 0, 0
    while n_kept < target and rounds <= max_resample_rounds:
        indices = draw(target - n_kept)
        groups, rewards = generate(indices)
        demos = demo_rewards(indices) if demo_rewards else [None] * len(indices)
        rounds += 1
        for i, g, r, d in zip(indices, groups, rewards, demos):
            keep = not is_uniform(r, d)
            drawn.append((i, g, r, keep))
            n_kept += keep
    fill = 0
    if n_kept < target:  # still short: whole mini-batches and DP shares, never empty
        fill = (-n_kept) % multiple if n_kept else multiple
    chosen, filled = [], 0
    for entry in drawn:
        if entry[3]:
            chosen.append(entry)
        elif filled < fill:
            chosen.append(entry)
            filled += 1
    dropped = [e for e in drawn if not e[3]]
    all_r = [x for e in drawn for x in e[2]]
    stats = {"dynamic/kept": n_kept, "dynamic/dropped": len(dropped),
             "dynamic/padded": filled, "dynamic/rounds": rounds,
             "dynamic/prompts_drawn": len(drawn),
             "dynamic/dropped_solved": sum(1 for e in dropped if e[2] and e[2][0] > 0),
             "dynamic/reward_mean_drawn": sum(all_r) / max(len(all_r), 1),
             # what the step cost, every round included (the trainer's ledger/*)
             "ledger/prompts": len(drawn),
             "ledger/rollout_tokens": sum(len(c.token_ids) for e in drawn for c in e[1])}
    if n_kept < target and log is not None:
        log(f"dynamic sampling: {n_kept} of {target} groups kept after {rounds} rounds "
            f"({len(drawn)} prompts drawn, rollout.max_resample_rounds={max_resample_rounds})"
            f"; training on {len(chosen)} groups ({filled} of them dropped ones, reused so the "
            f"count is a multiple of {multiple})")
    batch = ([e[0] for e in chosen], [e[1] for e in chosen], [e[2] for e in chosen])
    return batch, stats
