"""The SRFT objective and its baselines (arXiv 2506.19767, section 4), token by token.

Total (Eq. 13): L_SRFT = L_SFT (Eq. 8, demonstrations) + L_offpolicy (Eq. 9-10,
demonstrations) + L_onpolicy (Eq. 11-12, own rollouts). Each equation is one pure function
below; :func:`srft_loss` assembles them for the algorithm named in the config and
:func:`make_loss_func` wraps that as the per-micro-batch ``loss_func`` of Megatron's
forward-backward schedules.

Populations and aggregation: the SFT term is averaged over demonstration tokens; the RL
terms (off-policy on demonstrations and on-policy on rollouts) are averaged together over
the tokens of the sequences they cover, as in LUFFY's pooled policy loss; the optional
entropy bonus over all trained tokens. ``loss_agg`` picks the average: token-mean,
seq-mean-token-mean, sum-max-len (LUFFY's: token sum / max response length, no division by
the sequence count; its entropy bonus a token mean) or seq-sum-max-len (the same sum also
divided by the sequence count, and so is its token-mean entropy bonus).
Averages are over the whole global batch: :class:`BatchTotals` holds its token and
sequence counts, so a micro-batch contributes sum / global count and the result does not
depend on how the batch is split over micro-batches and DP ranks. With
``train.mini_batches`` > 1 each optimizer mini-batch is its own global batch.

The step: one no-grad pass of the policy that generated the rollouts gives the old
log-probs (``ppo_token_loss``'s pi_old: ratio exactly 1 on the first mini-batch, clipped
from the second on; the config refuses dropout, which that pass would not apply) and the
step's entropy H, one detached scalar shared by every micro-batch and rank, in
w_SFT = 0.5 exp(-H) and w_RL = 0.1 exp(H) (the paper's "policy entropy over the current
batch"; ``entropy_weighting=token`` is the per-token variant). ``algorithm.weight_schedule``
other than ``exp`` replaces the two by the step's scalars (:class:`BatchTotals` ``weights``,
from :mod:`srft_mcore.algo.weight_schedule`).

Shape suffixes: b sequences of a micro-batch, s positions; ``_bs`` per token, ``_b`` per
sequence. Per-token inputs are aligned with targets: ``logp_bs[i, j]`` is the log-prob of
``targets[i, j]``, and ``loss_mask_bs`` is 1 where a token is trained (response tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

ALGORITHMS = ("sft", "grpo", "luffy", "srft", "srft_no_wsft", "srft_no_wrl")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "sum-max-len", "seq-sum-max-len")
_SRFT = ("srft", "srft_no_wsft", "srft_no_wrl")


# --------------------------------------------------------------------------- equations
def sft_weight(entropy_bs: torch.Tensor, c_sft: float = 0.5, sign: float = -1.0) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 8 weight: w_SFT = c_sft * stopgrad(exp(sign * H)).

    The paper writes sign = -1: confident (low-entropy) demonstrations get more SFT weight.
    """
    return c_sft * torch.exp(sign * entropy_bs.detach())


def sft_token_loss(logp_bs: torch.Tensor) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 8 per token: -log pi(y*_t) (weighted and averaged by the caller)."""
    return -logp_bs


def offpolicy_demo_token_loss(logp_bs: torch.Tensor, adv_bs: torch.Tensor,
                              shaping: str = "none", gamma: float = 0.1) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 9-10 per token: -A_demo * f(pi(y*_t) / pi_beta(y*_t)).

    pi_beta := 1 (the expert's probabilities are unknown) and no clipping. f is the identity
    (``none``) or LUFFY's policy shaping f(p) = p / (p + gamma) (``luffy``), which raises
    the gradient on low-probability expert tokens.
    """
    p_bs = logp_bs.exp()
    if shaping == "none":
        f_bs = p_bs
    elif shaping == "luffy":
        f_bs = p_bs / (p_bs + gamma)
    else:
        raise ValueError(f"offpolicy_shaping must be none or luffy, got {shaping!r}")
    return -adv_bs * f_bs


def rl_weight(entropy_bs: torch.Tensor, c_rl: float = 0.1) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 12 weight: w_RL = c_rl * stopgrad(exp(H)) (positive samples)."""
    return c_rl * torch.exp(entropy_bs.detach())


def sign_advantage(positive_bs: torch.Tensor) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 11: the on-policy term with rewards +-1, i.e. advantage +1 on
    positive and -1 on negative samples. Through :func:`ppo_token_loss` at ratio 1 its
    gradient is -grad log pi(y+_t) + grad log pi(y-_t), Eq. 11 as written; w_RL is applied
    by the caller."""
    return positive_bs.float() * 2.0 - 1.0


def ppo_token_loss(logp_bs: torch.Tensor, old_logp_bs: Optional[torch.Tensor],
                   adv_bs: torch.Tensor, clip_eps: Optional[float] = None,
                   clip_eps_high: Optional[float] = None):
    """Clipped-ratio policy gradient, the general form of Eq. 11-12 (and GRPO's loss).

    ratio = pi / pi_old with pi_old the policy that generated the step (the old-log-prob
    pass); the detached current policy when none is given, so ratio = 1 with gradient
    -A * grad log pi. Without ``clip_eps``: -A * ratio; with it, PPO's pessimistic clip of
    the ratio to [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high`` None: clip_eps; DAPO's
    clip-higher raises it). Returns (loss_bs, ratio_bs, clipped_bs).
    """
    old_bs = logp_bs.detach() if old_logp_bs is None else old_logp_bs.float()
    ratio_bs = torch.exp(logp_bs - old_bs)
    unclipped_bs = -adv_bs * ratio_bs
    if clip_eps is None:
        return unclipped_bs, ratio_bs, torch.zeros_like(ratio_bs, dtype=torch.bool)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped_bs = -adv_bs * ratio_bs.clamp(1.0 - clip_eps, 1.0 + high)
    return torch.maximum(unclipped_bs, clipped_bs), ratio_bs, clipped_bs > unclipped_bs


def clip_range(cfg) -> tuple:
    """(low, high) of the ratio clip from a resolved AlgorithmConfig: clip_eps_low /
    clip_eps_high, each null taking clip_eps; (None, None): no clip (clip_eps null or
    negative)."""
    clip = None if cfg.clip_eps is not None and cfg.clip_eps < 0 else cfg.clip_eps  # off
    low, high = getattr(cfg, "clip_eps_low", None), getattr(cfg, "clip_eps_high", None)
    low = clip if low is None else low
    high = clip if high is None else high
    if (low is None) != (high is None):
        raise ValueError(f"one side of the ratio clip is set (low={low}, high={high}) and "
                         f"the other has no clip_eps to fall back on: set both")
    return low, high


def kl_penalty(logp_bs: torch.Tensor, ref_logp_bs: torch.Tensor, estimator: str = "k3"):
    """Per-token KL(pi || pi_ref) estimate on samples of pi: k1 = log pi - log pi_ref, or
    k3 = exp(d) - d - 1 with d = log pi_ref - log pi (unbiased and >= 0)."""
    if estimator == "k1":
        return logp_bs - ref_logp_bs
    if estimator == "k3":
        d_bs = ref_logp_bs - logp_bs
        return torch.exp(d_bs) - d_bs - 1.0
    raise ValueError(f"kl_estimator must be k1 or k3, got {estimator!r}")


def tis_weight(old_logp_bs: torch.Tensor, rollout_logp_bs: torch.Tensor,
               cap: float) -> torch.Tensor:
    """Truncated importance weight min(pi_old / pi_sglang, cap) (detached): corrects for the
    inference engine sampling from a slightly different distribution than the trainer's."""
    return torch.exp(old_logp_bs.float() - rollout_logp_bs.float()).clamp(max=cap).detach()


# --------------------------------------------------------------------------- aggregation
@dataclass
class BatchTotals:
    """Counts over the whole global batch (every micro-batch, every DP rank).

    Computed once per optimizer step with :func:`batch_totals`. ``batch_entropy``: the
    step's mean entropy (``entropy_weighting=batch``), the same detached scalar on every
    micro-batch, mini-batch and rank, from the old-log-prob pass before the first update.
    ``weights``: the step's (w_SFT, w_RL) scalars from ``algorithm.weight_schedule``
    (:mod:`srft_mcore.algo.weight_schedule`), used for every token instead of the paper's
    weights of the entropy; None (``exp``): the paper's.
    """

    demo_tokens: float
    rollout_tokens: float
    demo_seqs: float
    rollout_seqs: float
    max_len: int = 1
    batch_entropy: Optional[float] = None
    weights: Optional[tuple] = None


def batch_totals(loss_mask_bs: torch.Tensor, is_demo_b: torch.Tensor, max_len: int = 1,
                 dp_group=None, batch_entropy: Optional[float] = None) -> BatchTotals:
    """Token and sequence counts of this rank's share of the batch, summed over ``dp_group``.

    max_len: the maximum response length, the denominator of ``(seq-)sum-max-len``.
    A sequence counts when it has at least one trained token.
    """
    mask_bs = loss_mask_bs.float()
    demo_b = is_demo_b.bool()
    has_b = (mask_bs.sum(-1) > 0).float()
    counts = torch.stack([
        (mask_bs.sum(-1) * demo_b).sum(), (mask_bs.sum(-1) * ~demo_b).sum(),
        (has_b * demo_b).sum(), (has_b * ~demo_b).sum()]).double()
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    d_tok, r_tok, d_seq, r_seq = counts.tolist()
    return BatchTotals(d_tok, r_tok, d_seq, r_seq, max_len, batch_entropy)


def aggregate(token_loss_bs: torch.Tensor, mask_bs: torch.Tensor, mode: str,
              n_tokens: float, n_seqs: float, max_len: int = 1,
              seq_ids_bs: Optional[torch.Tensor] = None, n_local: int = 0) -> torch.Tensor:
    """This micro-batch's share of a global average of ``token_loss_bs`` over ``mask_bs``.

    Summing the results of all micro-batches (of all DP ranks) gives the global average.
    seq_ids_bs: the sequence of each position (packed rows hold several; -1 = padding),
    ``n_local`` sequences in this micro-batch; None = one sequence per row.
    """
    masked_bs = token_loss_bs * mask_bs
    if mode == "token-mean":
        return masked_bs.sum() / max(n_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        if seq_ids_bs is None:
            per_seq = masked_bs.sum(-1) / mask_bs.sum(-1).clamp(min=1.0)
        else:  # per-sequence sums of packed rows; padding carries mask 0
            idx = seq_ids_bs.clamp(min=0).reshape(-1)
            sums = masked_bs.new_zeros(n_local).index_add_(0, idx, masked_bs.reshape(-1))
            counts = mask_bs.new_zeros(n_local).index_add_(0, idx, mask_bs.reshape(-1))
            per_seq = sums / counts.clamp(min=1.0)
        return per_seq.sum() / max(n_seqs, 1.0)
    if mode == "sum-max-len":  # LUFFY's scale: grows with the batch's sequences
        return masked_bs.sum() / max_len
    if mode == "seq-sum-max-len":
        return masked_bs.sum() / (max_len * max(n_seqs, 1.0))
    raise ValueError(f"loss_agg must be one of {AGGREGATIONS}, got {mode!r}")


def per_token(x, seq_ids_bs: torch.Tensor) -> torch.Tensor:
    """A per-sequence value [n] spread over the positions of its sequence [b, s]."""
    return x if x.dim() == 2 else x[seq_ids_bs.clamp(min=0)]


def entropy_for_weights(entropy_bs: torch.Tensor, mode: str,
                        batch_entropy: Optional[float] = None) -> torch.Tensor:
    """The (detached) entropy that enters w_SFT and w_RL: per token, or the step's one
    batch mean (computed before the first update by the old-log-prob pass)."""
    ent_bs = entropy_bs.detach()
    if mode == "token":
        return ent_bs
    if mode != "batch":
        raise ValueError(f"entropy_weighting must be token or batch, got {mode!r}")
    if batch_entropy is None:
        raise ValueError("entropy_weighting=batch needs BatchTotals.batch_entropy (the step's "
                         "mean entropy from the old-log-prob pass)")
    return torch.full_like(ent_bs, float(batch_entropy))


def entropy_token_mask(mask_bs: torch.Tensor, demo: torch.Tensor, which: str) -> torch.Tensor:
    """Tokens whose mean entropy is the step's H: rollout | demo | all trained tokens.
    demo: per row [b] or per position [b, s]."""
    demo_b = demo.bool()
    demo_b = demo_b.unsqueeze(-1) if demo_b.dim() == 1 else demo_b
    if which == "rollout":
        return mask_bs * ~demo_b
    if which == "demo":
        return mask_bs * demo_b
    if which == "all":
        return mask_bs
    raise ValueError(f"entropy_tokens must be rollout, demo or all, got {which!r}")


# --------------------------------------------------------------------------- the objective
def _metric(num, den, like: torch.Tensor) -> torch.Tensor:
    """Metrics travel as [numerator, denominator] device tensors, summed over micro-batches
    and ranks once per step. Python numbers become device tensors by a fill (``torch.full``),
    never by ``torch.tensor(x).to(device)``, a blocking host-to-device copy."""
    def on_device(x):
        if torch.is_tensor(x):
            return x.detach().double().reshape(())
        return torch.full((), float(x), dtype=torch.float64, device=like.device)

    return torch.stack([on_device(num), on_device(den)])


def _masked_metric(x_bs, mask_bs):
    # float64 sums: a per-step constant (the batch-entropy weights) averages back to itself
    x_bs, mask_bs = x_bs.detach().double(), mask_bs.double()
    return _metric((x_bs * mask_bs).sum(), mask_bs.sum(), x_bs)


def _max_metric(x_bs, mask_bs):
    """[max over masked tokens, 1]; keys ending in ``_max`` are reduced with max."""
    x_bs = x_bs.detach().float()
    masked = torch.where(mask_bs > 0, x_bs, torch.full_like(x_bs, -math.inf))
    return _metric(masked.max() if masked.numel() else -math.inf, 1.0, x_bs)


def srft_loss(logp_bs: torch.Tensor, entropy_bs: torch.Tensor, batch: dict, cfg,
              totals: BatchTotals, onpolicy_form: Optional[str] = None,
              metric_share: float = 1.0):
    """arXiv 2506.19767, Eq. 13 (and the baselines): this micro-batch's share of the loss.

    batch: ``loss_mask`` [b, s], ``is_demo`` [b] bool, ``advantages`` [b] or [b, s],
    ``rewards`` [b] (reward > 0 marks a positive sample); optional per-token
    ``old_logprobs`` (the policy that generated the step; ratio 1 without), ``ref_logprobs``
    (for ``kl_coef``), ``rollout_logprobs`` + ``rollout_logprob_mask`` (SGLang's, for
    ``tis_cap``). cfg: an :class:`srft_mcore.config.AlgorithmConfig` (null fields take the
    algorithm's defaults). onpolicy_form overrides cfg.onpolicy_form for the SRFT variants:
    ``sign`` (Eq. 11: advantage +1, weighted by w_RL, on positive and -1 on negative rollouts)
    or ``ppo`` (Eq. 7 advantages, w_RL on positive rollouts); both through the clipped ratio.
    GRPO and LUFFY always use ``ppo``. metric_share: the denominator given to loss-term
    metrics (1 / (micro-batches * DP ranks), so that reduced metrics equal the global terms).
    Returns (loss, metrics), metrics as [numerator, denominator] tensors.
    """
    from srft_mcore.algo.defaults import resolve

    if cfg.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name must be one of {ALGORITHMS}, got {cfg.name!r}")
    cfg = resolve(cfg)
    name = cfg.name
    form = onpolicy_form or cfg.onpolicy_form
    if form not in ("sign", "ppo"):
        raise ValueError(f"onpolicy_form must be sign or ppo, got {form!r}")
    logp_bs = logp_bs.float()
    entropy_bs = entropy_bs.float()
    dev = logp_bs.device
    # the batch is on the device already (one non-blocking copy per micro-batch)
    mask_bs = batch["loss_mask"].float()
    seq_bs = batch.get("seq_ids")  # packed rows: the sequence of each position
    n_local = batch["is_demo"].shape[0]
    seq_bs = (torch.arange(mask_bs.shape[0], device=dev).unsqueeze(-1).expand_as(mask_bs)
              if seq_bs is None else seq_bs)
    is_demo_bs = per_token(batch["is_demo"].bool(), seq_bs)
    demo_bs = mask_bs * is_demo_bs
    roll_bs = mask_bs * ~is_demo_bs
    adv_bs = batch.get("advantages")
    if adv_bs is not None:
        adv_bs = per_token(adv_bs.float(), seq_bs)
    old_bs = batch.get("old_logprobs")
    old_bs = old_bs.float() if old_bs is not None else None
    agg, t = cfg.loss_agg, totals
    has_offpolicy = name == "luffy" or name in _SRFT
    has_onpolicy = name != "sft"
    # the RL terms are pooled over rollouts and, when trained off-policy, demonstrations
    rl_tokens = t.rollout_tokens + (t.demo_tokens if has_offpolicy else 0.0)
    rl_seqs = t.rollout_seqs + (t.demo_seqs if has_offpolicy else 0.0)
    w_sft_e_bs = w_rl_e_bs = None  # the entropy-aware weights (SRFT only)
    if t.weights is None:  # the paper's weights of the entropy (weight_schedule=exp)
        h_w_bs = entropy_for_weights(entropy_bs, cfg.entropy_weighting, t.batch_entropy)
        cap = cfg.token_weight_cap if cfg.entropy_weighting == "token" else math.inf
        if name in _SRFT:
            w_sft_e_bs = sft_weight(h_w_bs, cfg.c_sft, cfg.sft_entropy_sign).clamp(max=cap)
            w_rl_e_bs = rl_weight(h_w_bs, cfg.c_rl).clamp(max=cap)
    else:  # a schedule's two scalars for the whole step
        w_sft_e_bs = torch.full_like(logp_bs, float(t.weights[0]))
        w_rl_e_bs = torch.full_like(logp_bs, float(t.weights[1]))

    zero = logp_bs.sum() * 0.0  # keeps the graph connected when a term is absent
    terms = {}
    metrics = {}
    if name == "sft" or name in _SRFT:
        if name in ("srft", "srft_no_wrl"):
            w_sft_bs = w_sft_e_bs
        else:
            w_sft_bs = torch.full_like(logp_bs, 1.0 if name == "sft" else cfg.fixed_weight)
        terms["sft"] = aggregate(w_sft_bs * sft_token_loss(logp_bs), demo_bs, agg,
                                 t.demo_tokens, t.demo_seqs, t.max_len, seq_bs, n_local)
        metrics["w_sft"] = _masked_metric(w_sft_bs, demo_bs)
    if has_offpolicy:
        off_bs = offpolicy_demo_token_loss(logp_bs, adv_bs, cfg.offpolicy_shaping,
                                           cfg.shaping_gamma)
        terms["offpolicy"] = aggregate(off_bs, demo_bs, agg, rl_tokens, rl_seqs, t.max_len,
                                       seq_bs, n_local)
    if has_onpolicy:
        positive_bs = per_token(batch["rewards"].float(), seq_bs) > 0
        if name in _SRFT:
            w_pos_bs = (w_rl_e_bs if name in ("srft", "srft_no_wsft")
                        else torch.full_like(logp_bs, cfg.fixed_weight))
            w_rl_bs = torch.where(positive_bs, w_pos_bs, torch.ones_like(w_pos_bs))
            metrics["w_rl"] = _masked_metric(w_pos_bs, roll_bs * positive_bs)
            # Eq. 11's own value (a likelihood, whatever onpolicy_form): reduce_metrics
            # combines the two means into loss/eq11 = -eq11/positive + eq11/negative
            metrics["eq11/positive"] = _masked_metric(w_pos_bs * logp_bs,
                                                      roll_bs * positive_bs)
            metrics["eq11/negative"] = _masked_metric(logp_bs, roll_bs * ~positive_bs)
        else:
            w_rl_bs = torch.ones_like(logp_bs)
        on_adv_bs = sign_advantage(positive_bs) if name in _SRFT and form == "sign" else adv_bs
        on_bs, ratio_bs, clipped_bs = ppo_token_loss(logp_bs, old_bs, on_adv_bs, *clip_range(cfg))
        if cfg.tis_cap is not None and "rollout_logprobs" in batch and old_bs is not None:
            have_bs = batch["rollout_logprob_mask"].float()
            tis_bs = torch.where(have_bs > 0, tis_weight(old_bs, batch["rollout_logprobs"],
                                                         cfg.tis_cap), torch.ones_like(on_bs))
            on_bs = on_bs * tis_bs
            metrics["tis/weight"] = _masked_metric(tis_bs, roll_bs)
        terms["onpolicy"] = aggregate(w_rl_bs * on_bs, roll_bs, agg, rl_tokens, rl_seqs,
                                      t.max_len, seq_bs, n_local)
        metrics["ppo/ratio"] = _masked_metric(ratio_bs, roll_bs)
        metrics["ppo/ratio_max"] = _max_metric(ratio_bs, roll_bs)
        metrics["ppo/clipfrac"] = _masked_metric(clipped_bs.float(), roll_bs)
        if old_bs is not None:  # KL(old || new) on the old policy's samples, k3
            metrics["ppo/approx_kl"] = _masked_metric(kl_penalty(old_bs, logp_bs.detach()),
                                                      roll_bs)
        if cfg.kl_coef:
            kl_bs = kl_penalty(logp_bs, batch["ref_logprobs"].float(), cfg.kl_estimator)
            terms["kl"] = cfg.kl_coef * aggregate(kl_bs, roll_bs, agg, t.rollout_tokens,
                                                  t.rollout_seqs, t.max_len, seq_bs, n_local)
            metrics["kl/ref"] = _masked_metric(kl_bs, roll_bs)
    if cfg.entropy_coef:  # over every token the algorithm trains on
        if name == "grpo":
            pop_bs, n_tok, n_seq = roll_bs, t.rollout_tokens, t.rollout_seqs
        elif name == "sft":
            pop_bs, n_tok, n_seq = demo_bs, t.demo_tokens, t.demo_seqs
        else:
            pop_bs = mask_bs
            n_tok, n_seq = t.demo_tokens + t.rollout_tokens, t.demo_seqs + t.rollout_seqs
        if agg == "sum-max-len":
            # LUFFY's actor takes the bonus as a token mean whatever its policy loss does
            bonus = aggregate(entropy_bs, pop_bs, "token-mean", n_tok, n_seq)
        elif agg == "seq-sum-max-len":
            # LUFFY's loss and bonus, both divided by the sequence count
            bonus = aggregate(entropy_bs, pop_bs, "token-mean", n_tok * max(n_seq, 1.0), n_seq)
        else:
            bonus = aggregate(entropy_bs, pop_bs, agg, n_tok, n_seq, t.max_len, seq_bs, n_local)
        terms["entropy_bonus"] = -cfg.entropy_coef * bonus

    loss = zero + sum(terms.values())
    metrics["loss"] = _metric(loss, metric_share, logp_bs)
    for k, v in terms.items():
        metrics[f"loss/{k}"] = _metric(v, metric_share, logp_bs)
    metrics["entropy/demo"] = _masked_metric(entropy_bs, demo_bs)
    metrics["entropy/rollout"] = _masked_metric(entropy_bs, roll_bs)
    if "rewards" in batch:  # by outcome; a side without tokens reduces to NaN (logged null)
        pos_bs = per_token(batch["rewards"].float(), seq_bs) > 0
        metrics["entropy/rollout_pos"] = _masked_metric(entropy_bs, roll_bs * pos_bs)
        metrics["entropy/rollout_neg"] = _masked_metric(entropy_bs, roll_bs * ~pos_bs)
    metrics["logp/demo"] = _masked_metric(logp_bs, demo_bs)
    metrics["logp/rollout"] = _masked_metric(logp_bs, roll_bs)
    if adv_bs is not None:
        metrics["adv/demo"] = _masked_metric(adv_bs, demo_bs)
        metrics["adv/rollout"] = _masked_metric(adv_bs, roll_bs)
    return loss, metrics


# --------------------------------------------------------------------------- megatron glue
def make_loss_func(cfg, totals: BatchTotals, *, num_microbatches: int, dp_size: int,
                   onpolicy_form: Optional[str] = None) -> Callable:
    """Megatron ``loss_func`` factory: ``partial(loss_func, micro_batch)`` is what a
    ``forward_step_func`` returns beside the model output ``(logp_bs, entropy_bs)``.

    Scaling: Megatron divides each micro-batch loss by ``num_microbatches`` and DDP averages
    gradients over the ``dp_size`` data-parallel ranks, so the returned loss is this
    micro-batch's share of the global loss (its sums over the global counts in ``totals``)
    times ``num_microbatches * dp_size``. The gradient is then that of the global-batch loss,
    whatever the split. ``metrics['loss']`` etc. hold the unscaled shares; reduce the list of
    metric dicts with :func:`reduce_metrics`.
    """
    scale = float(num_microbatches * dp_size)

    def loss_func(batch: dict, output):
        # (logp, entropy), or (loss, logp, entropy) when the loss was formed in the kernel
        # (its logp and entropy are detached: here they give the metrics only)
        loss, metrics = srft_loss(*output[-2:], batch, cfg, totals, onpolicy_form,
                                  metric_share=1.0 / scale)
        if len(output) == 3:
            loss = output[0]
        return loss * scale, metrics

    def token_loss(batch: dict) -> Callable:
        """The micro-batch's unscaled loss as a function of (logp_bs, entropy_bs) only, for
        a kernel that forms its gradient (a sum of per-token terms: every normaliser is a
        constant of ``totals``, every entropy weight detached)."""
        return lambda logp_bs, entropy_bs: srft_loss(logp_bs, entropy_bs, batch, cfg, totals,
                                                     onpolicy_form)[0]

    loss_func.token_loss = token_loss
    return loss_func


def reduce_metrics(metric_dicts: list, dp_group=None) -> dict:
    """Sum [numerator, denominator] metrics over micro-batches (and ``dp_group``); ratios.

    Keys ending in ``_max`` hold [value, 1] and are reduced with max. One collective per
    kind and one device-to-host copy for the whole step. Metrics exist on the last pipeline
    stage only. A metric with denominator 0 is NaN. Derived from the reduced means:
    ``loss/eq11`` (:func:`eq11_value`).
    """
    keys = sorted({k for d in metric_dicts for k in d})
    if not keys:
        return {}
    device = next(iter(metric_dicts[0].values())).device
    sums = [k for k in keys if not k.endswith("_max")]
    maxes = [k for k in keys if k.endswith("_max")]
    summed = torch.zeros(len(sums), 2, dtype=torch.float64, device=device)
    maxed = torch.full((max(len(maxes), 1),), -math.inf, dtype=torch.float64, device=device)
    for d in metric_dicts:
        for i, k in enumerate(sums):
            if k in d:
                summed[i] += d[k].double()
        for i, k in enumerate(maxes):
            if k in d:
                maxed[i] = torch.maximum(maxed[i], d[k][0].double())
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(summed, group=dp_group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=dp_group)
    summed, maxed = summed.tolist(), maxed.tolist()
    out = {k: num / den if den != 0 else float("nan") for k, (num, den) in zip(sums, summed)}
    out.update({k: v if v != -math.inf else float("nan") for k, v in zip(maxes, maxed)})
    if "eq11/positive" in out or "eq11/negative" in out:
        out["loss/eq11"] = eq11_value(out)
    return out


def eq11_value(reduced: dict) -> float:
    """arXiv 2506.19767, Eq. 11's value on the step's rollouts from the reduced metrics:
    -mean_t w_RL log pi(y+_t) + mean_t log pi(y-_t) (means over the positive and the
    negative rollout tokens; a side without tokens, NaN, contributes 0). The logged
    surrogate ``loss/onpolicy`` is -A * ratio, constant at ratio 1 in the sign form."""
    def part(key):
        v = reduced.get(key, math.nan)
        return 0.0 if math.isnan(v) else v

    return -part("eq11/positive") + part("eq11/negative")
