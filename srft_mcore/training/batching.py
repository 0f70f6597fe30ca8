"""From rollouts and demonstrations to micro-batches for Megatron's schedules.

Each prompt contributes its ``n`` rollouts and (for algorithms that use them) its expert
demonstration; the demonstration joins the prompt's group for the advantage (Eq. 7).
Micro-batches are either padded (a fixed number of sequences, one per row, padded to the
step's longest) or packed (``train.max_tokens_per_micro_batch``: several sequences per row,
balanced bins of at most that many tokens). Every micro-batch of a step has one shape, so
pipeline stages exchange tensors of one shape, and every DP rank runs the same number.
Shape suffixes: b rows, s positions, n sequences of the micro-batch.
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
    demonstration counts as reward 1 (the expert's answer is the reference), or as
    ``ex.demo_reward`` when data.verify_demos scored it against the answer.
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
            # trusted as the expert's (1.0) unless data.verify_demos scored it (demo_reward)
            demo_reward = getattr(ex, "demo_reward", None)
            seqs.append(TrainSequence(list(ex.prompt_ids) + list(ex.demo_ids),
                                      len(ex.prompt_ids), True,
                                      1.0 if demo_reward is None else float(demo_reward), g))
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
                       pad_id: int, pad_to_multiple: int = 1,
                       max_tokens: Optional[int] = None) -> list:
    """This DP rank's micro-batches of ``seqs``, as dicts of tensors.

    Padded (``max_tokens`` None): ``micro_batch_size`` sequences per micro-batch, one per
    row, every row padded to the longest sequence; the sequence count is padded with empty
    (fully masked) sequences to a multiple of ``micro_batch_size * dp_size`` so every rank
    runs the same number of micro-batches.

    Packed (``max_tokens`` set): sequences are packed into rows of at most ``max_tokens``
    tokens (:func:`token_budget_bins`), one row per micro-batch, positions restarting at 0
    for each sequence; every rank gets the same number of rows. Attention must then stay
    inside each sequence: ``seq_ids`` says which sequence each position belongs to.

    Keys: tokens, targets, position_ids, loss_mask, seq_ids (-1 = padding),
    rollout_logprobs, rollout_logprob_mask [rows, s]; is_demo, advantages, rewards [n]: per
    sequence of the micro-batch, indexed by ``seq_ids`` (one sequence per row when padded).
    Lengths are padded to a multiple of ``pad_to_multiple`` (the TP size under sequence
    parallelism, which splits the sequence dimension over TP ranks).
    """
    if not seqs:
        raise ValueError("no sequences to train on in this step")
    if max_tokens is not None:
        bins = token_budget_bins([len(s.tokens) for s in seqs], max_tokens, dp_size)
        rows = [[[seqs[i] for i in b]] for b in bins[dp_rank]]  # one packed row each
        width = max(sum(len(seqs[i].tokens) for i in b) for rank in bins for b in rank)
    else:
        seqs = list(seqs) + [None] * ((-len(seqs)) % (micro_batch_size * dp_size))
        per_rank = len(seqs) // dp_size
        mine = seqs[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        rows = [[[s] if s is not None else [] for s in mine[i:i + micro_batch_size]]
                for i in range(0, per_rank, micro_batch_size)]
        width = max(len(s.tokens) for s in seqs if s is not None)
    width += (-width) % pad_to_multiple
    return [_micro_batch(mb_rows, width, pad_id) for mb_rows in rows]


def _micro_batch(rows: list, width: int, pad_id: int) -> dict:
    """Tensors of one micro-batch: ``rows`` is a list of rows, each a list of sequences."""
    b = len(rows)
    out = {"tokens": torch.full((b, width), pad_id, dtype=torch.long),
           "targets": torch.full((b, width), pad_id, dtype=torch.long),
           "position_ids": torch.zeros(b, width, dtype=torch.long),
           "loss_mask": torch.zeros(b, width),
           "seq_ids": torch.full((b, width), -1, dtype=torch.long),
           "rollout_logprobs": torch.zeros(b, width),
           "rollout_logprob_mask": torch.zeros(b, width)}
    flat, bounds = [], []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n, k, end = len(s.tokens), len(flat), start + len(s.tokens)
            t = torch.tensor(s.tokens, dtype=torch.long)
            out["tokens"][r, start:end] = t
            out["targets"][r, start:end - 1] = t[1:]
            out["position_ids"][r, start:end] = torch.arange(n)
            out["seq_ids"][r, start:end] = k
            # position p predicts token p+1: train where p+1 is a response token
            trained = slice(start + s.prompt_len - 1, end - 1)
            out["loss_mask"][r, trained] = 1.0
            if s.rollout_logprobs is not None:
                out["rollout_logprobs"][r, trained] = torch.tensor(s.rollout_logprobs,
                                                                   dtype=torch.float32)
                out["rollout_logprob_mask"][r, trained] = 1.0
            flat.append(s)
            start = end
        if start < width:  # padding positions continue the row's count, never trained
            out["position_ids"][r, start:] = torch.arange(start, width)
        bounds.append([0] + [len(s.tokens) for s in row] + ([width - start] if start < width
                                                            else []))
        if not row:  # an empty row (count padding) still gets one sequence slot
            flat.append(None)
            out["seq_ids"][r, :] = len(flat) - 1
    out["is_demo"] = torch.tensor([s is not None and s.is_demo for s in flat])
    out["advantages"] = torch.tensor([s.advantage if s else 0.0 for s in flat],
                                     dtype=torch.float32)
    out["rewards"] = torch.tensor([s.reward if s else 0.0 for s in flat], dtype=torch.float32)
    if b == 1:  # segment boundaries of a packed row (THD): host-side, no device sync later
        out["cu_seqlens"] = torch.tensor(bounds[0], dtype=torch.int32).cumsum(0).to(torch.int32)
        out["max_seqlen"] = max(bounds[0][1:], default=width)
    return out


def token_budget_bins(lengths: list, max_tokens: int, dp_size: int) -> list:
    """Balanced bins of sequence indices, at most ``max_tokens`` tokens each (a longer
    sequence gets a bin of its own), the same number of bins on each of ``dp_size`` ranks.

    Longest-processing-time greedy: sequences, longest first, go to the emptiest bin; the bin
    count starts at the least that can hold the tokens and grows by ``dp_size`` until every
    bin fits. Returns ``bins[rank] = [[seq indices in input order], ...]``. Deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    total = sum(lengths)
    n_bins = dp_size * max(1, -(-total // (max_tokens * dp_size)))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    while True:
        loads, bins = [0] * n_bins, [[] for _ in range(n_bins)]
        for i in order:
            j = min(range(n_bins), key=lambda k: (loads[k], k))
            bins[j].append(i)
            loads[j] += lengths[i]
        if all(load <= max_tokens or len(b) == 1 for load, b in zip(loads, bins)):
            break
        n_bins += dp_size
    # heaviest bins spread over the ranks in turn, so ranks carry similar token counts
    ranked = sorted(range(n_bins), key=lambda k: (-loads[k], k))
    return [[sorted(bins[k]) for k in ranked[r::dp_size]] for r in range(dp_size)]


def sequence_totals(seqs: list, max_len: int = 1, batch_entropy: Optional[float] = None):
    """:class:`BatchTotals` of a (mini-)batch from its sequences (every rank holds the whole
    list, so no collective): trained tokens and sequences, demonstrations vs rollouts."""
    from srft_mcore.algo.losses import BatchTotals

    n_tok = [len(s.tokens) - s.prompt_len for s in seqs]
    demo = [s.is_demo for s in seqs]
    return BatchTotals(
        demo_tokens=float(sum(n for n, d in zip(n_tok, demo) if d)),
        rollout_tokens=float(sum(n for n, d in zip(n_tok, demo) if not d)),
        demo_seqs=float(sum(1 for n, d in zip(n_tok, demo) if d and n > 0)),
        rollout_seqs=float(sum(1 for n, d in zip(n_tok, demo) if not d and n > 0)),
        max_len=max_len, batch_entropy=batch_entropy)
