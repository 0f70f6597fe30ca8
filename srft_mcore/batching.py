"""From rollouts and demonstrations to padded micro-batches for Megatron's schedules.

Each prompt contributes its ``n`` rollouts and (for algorithms that use them) its expert
demonstration; the demonstration joins the prompt's group for the advantage (Eq. 7). Every
micro-batch of a step is padded to the step's longest sequence so that pipeline stages
exchange tensors of one shape, and each DP rank takes a contiguous share.
Shape suffixes: b sequences, s positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from srft_mcore.algo.advantages import group_advantages

USES_DEMOS = {"sft", "luffy", "srft", "srft_no_wsft", "srft_no_wrl"}
USES_ROLLOUTS = {"grpo", "luffy", "srft", "srft_no_wsft", "srft_no_wrl"}


@dataclass
class TrainSequence:
    tokens: list
    """Prompt ids followed by response ids."""
    prompt_len: int
    """Number of prompt tokens (not trained)."""
    is_demo: bool
    reward: float
    group: int
    """Prompt index within the step (the advantage group)."""
    advantage: float = 0.0
    rollout_logprobs: Optional[list] = None
    """Per response token: the log-prob SGLang sampled it with (rollouts only)."""


def build_sequences(examples, completions, rewards, algo_cfg) -> list:
    """Sequences of one step: rollouts and demonstrations with their group advantages.

    examples: the step's prompts (``srft_mcore.data.Example``); completions[i]: the n
    rollouts of prompt i (objects with ``token_ids``); rewards[i]: their rewards. A
    demonstration counts as reward 1 (the expert's answer is the reference).
    """
    from srft_mcore.algo.defaults import resolve

    algo_cfg = resolve(algo_cfg)
    seqs = []
    for g, (ex, comps, rews) in enumerate(zip(examples, completions, rewards)):
        if algo_cfg.name in USES_ROLLOUTS:
            for c, r in zip(comps, rews):
                if len(c.token_ids) == 0:
                    continue
                lp = getattr(c, "logprobs", None)
                usable = (lp is not None and len(lp) == len(c.token_ids)
                          and all(x is not None for x in lp))
                seqs.append(TrainSequence(list(ex.prompt_ids) + list(c.token_ids),
                                          len(ex.prompt_ids), False, float(r), g,
                                          rollout_logprobs=list(lp) if usable else None))
        if algo_cfg.name in USES_DEMOS:
            if ex.demo_ids is None:
                raise ValueError(f"algorithm {algo_cfg.name!r} needs demonstrations, record "
                                 f"{ex.index} has none (data.demo_key)")
            seqs.append(TrainSequence(list(ex.prompt_ids) + list(ex.demo_ids),
                                      len(ex.prompt_ids), True, 1.0, g))
    if seqs:
        adv = group_advantages(torch.tensor([s.reward for s in seqs]),
                               torch.tensor([s.group for s in seqs]),
                               torch.tensor([s.is_demo for s in seqs]),
                               demo_in_group=algo_cfg.demo_in_group,
                               std_norm=algo_cfg.adv_std_norm)
        for s, a in zip(seqs, adv.tolist()):
            s.advantage = a
    return seqs


def split_mini_batches(seqs: list, n: int, n_groups: Optional[int] = None) -> list:
    """Split a step's sequences into ``n`` optimizer mini-batches of whole prompt groups
    (groups 0..G/n-1 first), so each mini-batch keeps every group's advantages intact.
    n_groups: the step's prompt count (default: the highest group index + 1)."""
    if n == 1:
        return [list(seqs)]
    n_groups = n_groups or max(s.group for s in seqs) + 1
    if n_groups % n:
        raise ValueError(f"{n_groups} prompt groups cannot be split into {n} mini-batches")
    per = n_groups // n
    return [[s for s in seqs if k * per <= s.group < (k + 1) * per] for k in range(n)]


def make_micro_batches(seqs: list, micro_batch_size: int, dp_rank: int, dp_size: int,
                       pad_id: int, pad_to_multiple: int = 1) -> list:
    """This DP rank's micro-batches; each a dict of tensors padded to the step's max length.

    The sequence count is padded with empty (fully masked) sequences to a multiple of
    ``micro_batch_size * dp_size`` so every rank runs the same number of micro-batches.
    The length is padded to a multiple of ``pad_to_multiple`` (the TP size under sequence
    parallelism, which splits the sequence dimension over TP ranks).
    """
    per_step = micro_batch_size * dp_size
    seqs = list(seqs)
    n_empty = (-len(seqs)) % per_step
    if not seqs:
        raise ValueError("no sequences to train on in this step")
    max_len = max(len(s.tokens) for s in seqs)
    max_len += (-max_len) % pad_to_multiple
    seqs += [TrainSequence([pad_id], 1, False, 0.0, -1)] * n_empty
    per_rank = len(seqs) // dp_size
    mine = seqs[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    batches = []
    for i in range(0, per_rank, micro_batch_size):
        chunk = mine[i:i + micro_batch_size]
        b = len(chunk)
        tokens_bs = torch.full((b, max_len), pad_id, dtype=torch.long)
        targets_bs = torch.full((b, max_len), pad_id, dtype=torch.long)
        mask_bs = torch.zeros(b, max_len)
        rollout_lp_bs = torch.zeros(b, max_len)
        have_lp_bs = torch.zeros(b, max_len)
        for j, s in enumerate(chunk):
            t = torch.tensor(s.tokens, dtype=torch.long)
            tokens_bs[j, :len(t)] = t
            targets_bs[j, :len(t) - 1] = t[1:]
            # position p predicts token p+1: train where p+1 is a response token
            mask_bs[j, s.prompt_len - 1:len(t) - 1] = 1.0 if s.group >= 0 else 0.0
            if s.rollout_logprobs is not None and s.group >= 0:
                rollout_lp_bs[j, s.prompt_len - 1:len(t) - 1] = torch.tensor(
                    s.rollout_logprobs, dtype=torch.float32)
                have_lp_bs[j, s.prompt_len - 1:len(t) - 1] = 1.0
        batches.append({
            "tokens": tokens_bs,
            "targets": targets_bs,
            "position_ids": torch.arange(max_len).unsqueeze(0).expand(b, -1),
            "loss_mask": mask_bs,
            "is_demo": torch.tensor([s.is_demo for s in chunk]),
            "advantages": torch.tensor([s.advantage for s in chunk], dtype=torch.float32),
            "rewards": torch.tensor([s.reward for s in chunk], dtype=torch.float32),
            "rollout_logprobs": rollout_lp_bs,
            "rollout_logprob_mask": have_lp_bs,
        })
    return batches
