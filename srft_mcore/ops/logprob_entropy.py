"""Per-token log-prob of the target and entropy of the full distribution, vocab-parallel.

The logits of a tensor-parallel output layer are split over the vocabulary: rank r holds
columns [r * v, (r + 1) * v) of the (padded) vocabulary. For every token the loss needs
``log p(target)`` and ``H = logsumexp(z) - sum_v p_v z_v``. Both come from three
per-token reductions over the vocabulary, so each token chunk costs two TP all-reduces:
MAX of the local maxima, then one SUM of the stacked (sum exp, sum exp*z, target logit).

Memory: nothing of size [T, V] is kept besides the caller's own logits (the chunked
function) or nothing at all (the linear-fused function recomputes one chunk of logits at a
time in backward). Only per-token fp32 statistics (max, log-sum-exp, entropy) are saved.

Vocabulary padding: Megatron pads the vocabulary to a multiple of 128 * TP; the padded
columns are not tokens. ``vocab_size`` (the true size) makes every function ignore them, so
the results equal a softmax over the real vocabulary, as in the HF model.

Gradients (z = logits / temperature, p = softmax(z)):
    d log p_target / dz_v = 1[v = target] - p_v
    d H / dz_v            = -p_v (log p_v + H)

Shape suffixes: t tokens (batch and sequence flattened), v this rank's vocabulary shard
(padded), h hidden size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# fp32 bytes of one chunk of logits; the working set of a chunk is about three of these
DEFAULT_CHUNK_BYTES = 128 * 2**20


# --------------------------------------------------------------------------- helpers
def _group_size_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(x: torch.Tensor, op, group) -> None:
    if _group_size_rank(group)[0] > 1:
        dist.all_reduce(x, op=op, group=group)


def _shard_range(v_local: int, vocab_size: Optional[int], group) -> tuple[int, int]:
    """(first global id of this shard, number of real, unpadded columns in it)."""
    tp, rank = _group_size_rank(group)
    start = rank * v_local
    if vocab_size is None:
        return start, v_local
    if vocab_size > v_local * tp:
        raise ValueError(f"vocab_size={vocab_size} exceeds the sharded vocabulary "
                         f"{v_local} x tp {tp}")
    return start, max(0, min(v_local, vocab_size - start))


def _chunk_len(chunk_size: Optional[int], n_cols: int) -> int:
    """Tokens per chunk. ``n_cols`` must be the padded shard width, equal on every TP rank:
    the ranks' chunk loops must issue the same collectives."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(n_cols, 1)))


def _local_targets(targets_t: torch.Tensor, start: int, n_valid: int):
    """Each token's target column in this shard (clamped into range) and whether the target
    lives here. Masks, not ``nonzero``: no device-to-host sync per chunk."""
    local_t = targets_t - start
    here_t = (local_t >= 0) & (local_t < n_valid)
    return local_t.clamp(0, max(n_valid - 1, 0)), here_t


def _forward_stats(z_tv: torch.Tensor, targets_t: torch.Tensor, start: int, group):
    """Per-token max, log-sum-exp offset, entropy and target log-prob of fp32 ``z_tv``.

    ``z_tv`` holds only this shard's real columns and is overwritten (it is a private copy).
    """
    n = z_tv.shape[0]
    if z_tv.shape[1] > 0:
        m_t = z_tv.max(dim=-1).values
    else:
        m_t = torch.full((n,), float("-inf"), dtype=torch.float32, device=z_tv.device)
    _all_reduce(m_t, dist.ReduceOp.MAX, group)
    zs_tv = z_tv.sub_(m_t.unsqueeze(-1))  # shifted logits, <= 0
    e_tv = zs_tv.exp()
    sums = torch.zeros(3, n, dtype=torch.float32, device=z_tv.device)
    sums[0] = e_tv.sum(dim=-1)
    sums[1] = torch.bmm(e_tv.unsqueeze(1), zs_tv.unsqueeze(-1)).view(n)  # no [t, v] product
    if zs_tv.shape[1] > 0:
        cols_t, here_t = _local_targets(targets_t, start, zs_tv.shape[1])
        picked_t = zs_tv.gather(1, cols_t.unsqueeze(-1)).squeeze(-1)
        sums[2] = torch.where(here_t, picked_t, torch.zeros_like(picked_t))
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_s_t = sums[0].log()
    entropy_t = log_s_t - sums[1] / sums[0]
    logp_t = sums[2] - log_s_t
    return m_t, log_s_t, entropy_t, logp_t


def _grad_z(z_tv, targets_t, start, m_t, log_s_t, entropy_t, g_lp_t, g_h_t):
    """d loss / d z for one chunk (fp32, overwrites the private copy ``z_tv``)."""
    logp_tv = z_tv.sub_(m_t.unsqueeze(-1)).sub_(log_s_t.unsqueeze(-1))
    p_tv = logp_tv.exp()
    if g_h_t is not None:
        coef_tv = logp_tv.add_(entropy_t.unsqueeze(-1)).mul_(g_h_t.unsqueeze(-1))
        if g_lp_t is not None:
            coef_tv.add_(g_lp_t.unsqueeze(-1))
        grad_tv = p_tv.mul_(coef_tv).neg_()
    else:
        grad_tv = p_tv.mul_(-g_lp_t.unsqueeze(-1))
    if g_lp_t is not None and grad_tv.shape[1] > 0:
        cols_t, here_t = _local_targets(targets_t, start, grad_tv.shape[1])
        add_t = torch.where(here_t, g_lp_t, torch.zeros_like(g_lp_t))
        grad_tv.scatter_add_(1, cols_t.unsqueeze(-1), add_t.unsqueeze(-1))
    return grad_tv


def _flat(x: torch.Tensor, last: int) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if last else x.reshape(-1)


# --------------------------------------------------------------------------- reference
def reference_logprob_entropy(logits_tv: torch.Tensor, targets_t: torch.Tensor,
                              vocab_size: Optional[int] = None, temperature: float = 1.0):
    """Plain full-vocabulary PyTorch: log_softmax, softmax, entropy (the unfused baseline)."""
    z = logits_tv.float()
    if vocab_size is not None:
        z = z[..., :vocab_size]
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    p_all = torch.softmax(z, dim=-1)
    entropy = -(p_all * logp_all).sum(dim=-1)
    logp = logp_all.gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
    return logp, entropy


# --------------------------------------------------------------------------- chunked
class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_tv, targets_t, vocab_size, temperature, chunk_size, group,
                entropy_grad):
        n_tok, v_local = logits_tv.shape
        start, n_valid = _shard_range(v_local, vocab_size, group)
        chunk = _chunk_len(chunk_size, v_local)
        stats = torch.empty(4, n_tok, dtype=torch.float32, device=logits_tv.device)
        for s in range(0, n_tok, chunk):
            z_tv = logits_tv[s:s + chunk, :n_valid].to(torch.float32, copy=True)
            if temperature != 1.0:
                z_tv.div_(temperature)
            out = _forward_stats(z_tv, targets_t[s:s + chunk], start, group)
            for i, x in enumerate(out):
                stats[i, s:s + chunk] = x
        m_t, log_s_t, entropy_t, logp_t = stats
        ctx.save_for_backward(logits_tv, targets_t, m_t, log_s_t, entropy_t)
        ctx.cfg = (start, n_valid, chunk, temperature)
        ctx.set_materialize_grads(False)
        logp_t, entropy_out_t = logp_t.clone(), entropy_t.clone()
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_out_t)
        return logp_t, entropy_out_t

    @staticmethod
    def backward(ctx, g_lp_t, g_h_t):
        logits_tv, targets_t, m_t, log_s_t, entropy_t = ctx.saved_tensors
        start, n_valid, chunk, temperature = ctx.cfg
        if (g_lp_t is None and g_h_t is None) or not ctx.needs_input_grad[0]:
            return (None,) * 7
        # padded columns get exactly zero gradient
        grad_tv = torch.zeros_like(logits_tv)
        for s in range(0, logits_tv.shape[0], chunk):
            sl = slice(s, s + chunk)
            z_tv = logits_tv[sl, :n_valid].to(torch.float32, copy=True)
            if temperature != 1.0:
                z_tv.div_(temperature)
            g = _grad_z(z_tv, targets_t[sl], start, m_t[sl], log_s_t[sl], entropy_t[sl],
                        None if g_lp_t is None else g_lp_t[sl].float(),
                        None if g_h_t is None else g_h_t[sl].float())
            if temperature != 1.0:
                g.div_(temperature)
            grad_tv[sl, :n_valid] = g
        return grad_tv, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                                   vocab_size: Optional[int] = None, tp_group=None,
                                   temperature: float = 1.0, chunk_size: Optional[int] = None,
                                   entropy_grad: bool = True):
    """Log-prob of ``targets`` and entropy from vocab-sharded logits, chunked over tokens.

    logits: [..., V/tp] (bf16 / fp16 / fp32) this rank's vocabulary shard, not modified.
    targets: [...] global token ids. Targets outside [0, vocab_size) give meaningless
    values (mask them in the loss). vocab_size: the true vocabulary; columns past it are
    padding and excluded. tp_group: the tensor-parallel group (None: no TP).
    temperature: the distribution is softmax(logits / temperature). chunk_size: tokens per
    chunk (default: ~128 MiB of fp32 logits). entropy_grad=False stops the entropy gradient.
    Returns (logp, entropy), fp32, shape [...].
    """
    lead = targets.shape
    logp, ent = _VocabParallelLogProbEntropy.apply(
        _flat(logits, 1), _flat(targets, 0).long(), vocab_size, float(temperature),
        chunk_size, tp_group, entropy_grad)
    return logp.view(lead), ent.view(lead)


# --------------------------------------------------------------------------- linear-fused
class _LinearVocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_th, weight_vh, targets_t, vocab_size, temperature, chunk_size,
                group, entropy_grad, reduce_hidden_grad):
        n_tok = hidden_th.shape[0]
        start, n_valid = _shard_range(weight_vh.shape[0], vocab_size, group)
        chunk = _chunk_len(chunk_size, weight_vh.shape[0])
        w_vh = weight_vh[:n_valid]  # padded rows are never multiplied
        stats = torch.empty(4, n_tok, dtype=torch.float32, device=hidden_th.device)
        for s in range(0, n_tok, chunk):
            z_tv = _chunk_logits(hidden_th[s:s + chunk], w_vh, temperature)
            out = _forward_stats(z_tv, targets_t[s:s + chunk], start, group)
            for i, x in enumerate(out):
                stats[i, s:s + chunk] = x
            del z_tv
        m_t, log_s_t, entropy_t, logp_t = stats
        ctx.save_for_backward(hidden_th, weight_vh, targets_t, m_t, log_s_t, entropy_t)
        ctx.cfg = (start, n_valid, chunk, temperature, group, reduce_hidden_grad)
        ctx.set_materialize_grads(False)
        logp_t, entropy_out_t = logp_t.clone(), entropy_t.clone()
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_out_t)
        return logp_t, entropy_out_t

    @staticmethod
    def backward(ctx, g_lp_t, g_h_t):
        hidden_th, weight_vh, targets_t, m_t, log_s_t, entropy_t = ctx.saved_tensors
        start, n_valid, chunk, temperature, group, reduce_hidden_grad = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_lp_t is None and g_h_t is None:
            return (None,) * 9
        w_vh = weight_vh[:n_valid]
        grad_h = torch.zeros(hidden_th.shape, dtype=torch.float32,
                             device=hidden_th.device) if need_h else None
        grad_w = torch.zeros(weight_vh.shape, dtype=torch.float32,
                             device=weight_vh.device) if need_w else None
        for s in range(0, hidden_th.shape[0], chunk):
            sl = slice(s, s + chunk)
            h_ch = hidden_th[sl]
            z_tv = _chunk_logits(h_ch, w_vh, temperature)
            g_tv = _grad_z(z_tv, targets_t[sl], start, m_t[sl], log_s_t[sl], entropy_t[sl],
                           None if g_lp_t is None else g_lp_t[sl].float(),
                           None if g_h_t is None else g_h_t[sl].float())
            if temperature != 1.0:
                g_tv.div_(temperature)
            # matmuls in the parameter dtype (tensor cores), accumulation in fp32
            g_low = g_tv if weight_vh.dtype == torch.float32 else g_tv.to(weight_vh.dtype)
            del g_tv, z_tv
            if need_h:
                grad_h[sl] = g_low @ w_vh
            if need_w:
                if g_low.dtype == torch.float32 and h_ch.dtype == torch.float32:
                    grad_w[:n_valid].addmm_(g_low.t(), h_ch)
                else:
                    grad_w[:n_valid] += (g_low.t() @ h_ch.to(g_low.dtype)).float()
            del g_low
        if need_h and reduce_hidden_grad:
            # each shard contributes its vocabulary's part of d loss / d hidden
            _all_reduce(grad_h, dist.ReduceOp.SUM, group)
        return (None if grad_h is None else grad_h.to(hidden_th.dtype),
                None if grad_w is None else grad_w.to(weight_vh.dtype),
                None, None, None, None, None, None, None)


def _chunk_logits(h_ch: torch.Tensor, w_vh: torch.Tensor, temperature: float) -> torch.Tensor:
    z_tv = (h_ch.to(w_vh.dtype) @ w_vh.t()).float()  # fp32 input: the matmul result is ours
    if temperature != 1.0:
        z_tv.div_(temperature)
    return z_tv


def linear_vocab_parallel_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                          targets: torch.Tensor, *,
                                          vocab_size: Optional[int] = None, tp_group=None,
                                          temperature: float = 1.0,
                                          chunk_size: Optional[int] = None,
                                          entropy_grad: bool = True,
                                          reduce_hidden_grad: bool = True):
    """Log-prob and entropy of ``hidden @ weight.T`` without materialising the logits.

    hidden: [..., h], the same on every TP rank. weight: [V/tp, h], this rank's vocabulary
    shard of the output layer (rows past ``vocab_size`` are padding, never used).
    Logits exist for one chunk of tokens at a time and are recomputed in backward.
    reduce_hidden_grad: all-reduce d loss / d hidden over ``tp_group`` (each rank holds
    only its vocabulary's part); pass False when the caller's own collective already sums
    it (e.g. the reduce-scatter of a sequence-parallel gather).
    Other arguments and the result as in :func:`vocab_parallel_logprob_entropy`.
    """
    lead = targets.shape
    logp, ent = _LinearVocabParallelLogProbEntropy.apply(
        _flat(hidden, 1), weight, _flat(targets, 0).long(), vocab_size, float(temperature),
        chunk_size, tp_group, entropy_grad, reduce_hidden_grad)
    return logp.view(lead), ent.view(lead)
