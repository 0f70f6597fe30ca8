"""Per-token log-prob of the target and entropy of the full distribution, vocab-parallel.

The logits of a tensor-parallel output layer are split over the vocabulary: rank r holds
columns [r * v, (r + 1) * v) of the (padded) vocabulary. For every token the loss needs
``log p(target)`` and ``H = logsumexp(z) - sum_v p_v z_v``. Both come from three
per-token reductions over the vocabulary, so each token chunk costs two TP all-reduces:
MAX of the local maxima, then one SUM of the stacked (sum exp, sum exp*z, target logit).

Memory: nothing of size [T, V] is kept besides the caller's own logits (the chunked
function). The linear-fused function recomputes the logits one chunk at a time in backward,
except its last chunk's, which the forward keeps: a budget of the size of the weight
gradient (V/tp x h in fp32) that the backward allocates anyway, so memory stays
independent of T while min(T, h) tokens skip the recomputing matmul (at T = 4096, h = 896,
a fifth of it). Otherwise only per-token fp32 statistics (log-sum-exp, entropy) are saved.
The token-loss function takes the loss itself (a sum of per-token terms) and forms its
gradient in the forward, chunk by chunk: no logits are recomputed, and what waits for the
backward is the two parameter gradients. Every pass over a chunk writes into buffers
allocated once per call (fresh large allocations cost a page fault per 4 KiB on the CPU),
and the chunked function reads the given logits in place.

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

# fp32 bytes of one chunk of logits. On a GPU the working set of a chunk is two of these
# (the logits and one temporary); on the CPU the temporaries are small vocabulary blocks, so
# the chunk is CPU_CHUNK_SCALE times larger (about the old three-chunk working set in one
# buffer): the output-layer matmuls of a few hundred tokens run ~10 % faster than of ~200.
DEFAULT_CHUNK_BYTES = 128 * 2**20
CPU_CHUNK_SCALE = 3
# CPU: elementwise passes run on blocks of about this many fp32 values (4 MiB), so that a
# block and its temporaries stay in the last-level cache from one pass to the next
CPU_BLOCK_ELEMS = 2**20


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


def _chunk_len(chunk_size: Optional[int], n_cols: int, n_tok: int, device) -> int:
    """Tokens per chunk. ``n_cols`` must be the padded shard width, equal on every TP rank:
    the ranks' chunk loops must issue the same collectives. The default splits the tokens
    into equal chunks (no small last chunk with a slow matmul)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    budget = DEFAULT_CHUNK_BYTES * (CPU_CHUNK_SCALE if device.type == "cpu" else 1)
    return _equal_chunks(n_tok, budget // (4 * max(n_cols, 1)))


def _equal_chunks(n_tok: int, most: int) -> int:
    """Tokens per chunk when ``n_tok`` tokens are split into as few equal chunks of at most
    ``most`` (at least 1) tokens as possible."""
    n_chunks = -(-max(n_tok, 1) // max(1, most))
    return -(-max(n_tok, 1) // n_chunks)


def _block_len(n_tok: int, n_valid: int, device) -> int:
    """Vocabulary columns per elementwise block: on GPUs the whole shard (one kernel per
    pass) up to a chunk's worth of values (the linear kernel's kept tail can be longer than
    a chunk), cache-sized blocks on the CPU."""
    if device.type != "cpu":
        return max(1, min(n_valid, DEFAULT_CHUNK_BYTES // (4 * max(n_tok, 1))))
    return max(1, CPU_BLOCK_ELEMS // max(n_tok, 1))


def _scratch(n: int, device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device)


def _like(buf: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A contiguous view of the flat scratch ``buf`` with the shape of ``ref``."""
    return buf[:ref.numel()].view(ref.shape)


def _local_targets(targets_t: torch.Tensor, start: int, n_valid: int):
    """Each token's target column in this shard (clamped into range) and whether the target
    lives here. Masks, not ``nonzero``: no device-to-host sync per chunk."""
    local_t = targets_t - start
    here_t = (local_t >= 0) & (local_t < n_valid)
    return local_t.clamp(0, max(n_valid - 1, 0)), here_t


def _scaled_minus(z, shift, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``out = float(z) / temperature - shift`` (``out`` may be ``z`` itself)."""
    if temperature == 1.0:
        return torch.sub(z, shift, out=out)  # mixed dtypes: computed in fp32
    if z.dtype == torch.float32:
        torch.div(z, temperature, out=out)
    else:
        out.copy_(z).div_(temperature)
    return out.sub_(shift)


def _rescale(s0_t, s1_t, d_t) -> None:
    """Move the sums ``s0 = sum exp(z - m)`` and ``s1 = sum exp(z - m) (z - m)`` to a new
    offset m' = m - d (d <= 0), in place: s0' = e^d s0, s1' = e^d (s1 + d s0). A token with
    no columns yet (s0 = 0, m = -inf) keeps its zeros."""
    d_t = torch.where(s0_t > 0, d_t, torch.zeros_like(d_t))
    r_t = d_t.exp()
    s1_t.add_(d_t * s0_t).mul_(r_t)
    s0_t.mul_(r_t)


def _forward_stats(z, vd: int, targets_t, start: int, temperature: float, group, blk: int,
                   tmp_a: Optional[torch.Tensor], tmp_b: torch.Tensor):
    """Per-token max, log-sum-exp offset, entropy and target log-prob of ``z / temperature``.

    ``z``: this shard's real columns of one chunk, the vocabulary along dim ``vd``, any float
    dtype. One pass over blocks of ``blk`` columns with a running max (online softmax: the
    sums are rescaled when a block raises it), so each block is read once while it is in
    cache. The shifted logits go to ``tmp_a`` (``None``: over ``z`` itself, a private fp32
    buffer), their exponentials to ``tmp_b``. Under TP the shards' sums are moved to the
    global max before they are added.
    """
    n, nv = z.shape[1 - vd], z.shape[vd]
    m_t = torch.full((n,), float("-inf"), dtype=torch.float32, device=z.device)
    sums = torch.zeros(3, n, dtype=torch.float32, device=z.device)
    if nv > 0:
        # the target before ``z`` is overwritten
        cols_t, here_t = _local_targets(targets_t, start, nv)
        picked_t = z.gather(vd, cols_t.unsqueeze(vd)).squeeze(vd).float()
        if temperature != 1.0:
            picked_t.div_(temperature)
    for v0 in range(0, nv, blk):
        zb = z.narrow(vd, v0, min(blk, nv - v0))
        top_t = zb.amax(dim=vd).float()
        if temperature != 1.0:
            top_t.div_(temperature)  # max(z / T) = max(z) / T exactly (division is monotone)
        if v0:
            new_t = torch.maximum(m_t, top_t)
            _rescale(sums[0], sums[1], m_t - new_t)
            m_t = new_t
        else:
            m_t = top_t
        # masked (-inf) columns so far: shift by 0, not by -inf (which gives NaN)
        shift_t = torch.where(m_t == float("-inf"), torch.zeros_like(m_t), m_t)
        zs = _scaled_minus(zb, shift_t.unsqueeze(vd), temperature,
                           zb if tmp_a is None else _like(tmp_a, zb))
        e = torch.exp(zs, out=_like(tmp_b, zb))
        sums[0] += e.sum(dim=vd)
        sums[1] += e.mul_(zs).sum(dim=vd)
    if _group_size_rank(group)[0] > 1:
        global_t = m_t.clone()
        _all_reduce(global_t, dist.ReduceOp.MAX, group)
        _rescale(sums[0], sums[1], m_t - global_t)
        m_t = global_t
    if nv > 0:
        sums[2] = torch.where(here_t, picked_t - m_t, torch.zeros_like(picked_t))
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_s_t = sums[0].log()
    entropy_t = log_s_t - sums[1] / sums[0]
    logp_t = sums[2] - log_s_t
    return m_t, log_s_t, entropy_t, logp_t


def _grad_z(z, vd: int, dst, targets_t, start: int, temperature: float, lse_t, entropy_t,
            g_lp_t, g_h_t, blk: int, tmp_a: Optional[torch.Tensor], tmp_b: torch.Tensor):
    """``dst`` = d loss / d z for one chunk (``z`` and ``dst`` as in :func:`_forward_stats`;
    ``dst`` may be ``z``). With p = softmax(z / T) and lse_t = m + log-sum-exp:
    d/dz_v = (g_lp [v = target] - p_v (g_h (log p_v + H) + g_lp)) / T, computed per block as
    p_v * (a * log p_v + b) with a = -g_h / T, b = -(g_h H + g_lp) / T."""
    nv = z.shape[vd]
    if nv == 0:
        return
    a_t = None if g_h_t is None else (g_h_t / -temperature).unsqueeze(vd)
    if g_h_t is None:
        b_t = g_lp_t / -temperature
    else:
        b_t = g_h_t * entropy_t
        if g_lp_t is not None:
            b_t += g_lp_t
        b_t.div_(-temperature)
    b_t = b_t.unsqueeze(vd)
    fp32_out = dst.dtype == torch.float32
    if g_lp_t is not None:
        cols_t, here_t = _local_targets(targets_t, start, nv)
        add_t = torch.where(here_t, g_lp_t / temperature, torch.zeros_like(g_lp_t))
    shift = lse_t.unsqueeze(vd)
    for v0 in range(0, nv, blk):
        width = min(blk, nv - v0)
        zb, db = z.narrow(vd, v0, width), dst.narrow(vd, v0, width)
        lp = _scaled_minus(zb, shift, temperature, zb if tmp_a is None else _like(tmp_a, zb))
        p = torch.exp(lp, out=_like(tmp_b, zb))
        coef = b_t if a_t is None else torch.addcmul(b_t, lp, a_t, out=lp)
        if fp32_out:
            torch.mul(p, coef, out=db)
            continue
        # low-precision gradient: add the target term in fp32, round once
        p.mul_(coef)
        if g_lp_t is not None:
            local_t = cols_t - v0
            in_t = here_t & (local_t >= 0) & (local_t < width)
            p.scatter_add_(vd, local_t.clamp(0, width - 1).unsqueeze(vd),
                           torch.where(in_t, add_t, torch.zeros_like(add_t)).unsqueeze(vd))
        db.copy_(p)
    if fp32_out and g_lp_t is not None:
        dst.scatter_add_(vd, cols_t.unsqueeze(vd), add_t.unsqueeze(vd))


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
        dev = logits_tv.device
        start, n_valid = _shard_range(v_local, vocab_size, group)
        chunk = _chunk_len(chunk_size, v_local, n_tok, dev)
        blk = _block_len(min(chunk, n_tok), n_valid, dev)
        # the logits are read in place; only block-sized fp32 temporaries
        n_tmp = min(chunk, n_tok) * min(blk, n_valid)
        tmp_a, tmp_b = _scratch(n_tmp, dev), _scratch(n_tmp, dev)
        stats = torch.empty(4, n_tok, dtype=torch.float32, device=dev)
        for s in range(0, n_tok, chunk):
            out = _forward_stats(logits_tv[s:s + chunk, :n_valid], 1, targets_t[s:s + chunk],
                                 start, temperature, group, blk, tmp_a, tmp_b)
            for i, x in enumerate(out):
                stats[i, s:s + chunk] = x
        del tmp_a, tmp_b
        m_t, log_s_t, entropy_t, logp_t = stats
        ctx.save_for_backward(logits_tv, targets_t, m_t + log_s_t, entropy_t)
        ctx.cfg = (start, n_valid, chunk, blk, temperature)
        ctx.set_materialize_grads(False)
        logp_t, entropy_out_t = logp_t.clone(), entropy_t.clone()
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_out_t)
        return logp_t, entropy_out_t

    @staticmethod
    def backward(ctx, g_lp_t, g_h_t):
        logits_tv, targets_t, lse_t, entropy_t = ctx.saved_tensors
        start, n_valid, chunk, blk, temperature = ctx.cfg
        if (g_lp_t is None and g_h_t is None) or not ctx.needs_input_grad[0]:
            return (None,) * 7
        n_tok = logits_tv.shape[0]
        grad_tv = torch.empty_like(logits_tv)
        grad_tv[:, n_valid:].zero_()  # padded columns get exactly zero gradient
        n_tmp = min(chunk, n_tok) * min(blk, n_valid)
        tmp_a, tmp_b = _scratch(n_tmp, logits_tv.device), _scratch(n_tmp, logits_tv.device)
        for s in range(0, n_tok, chunk):
            sl = slice(s, s + chunk)
            _grad_z(logits_tv[sl, :n_valid], 1, grad_tv[sl, :n_valid], targets_t[sl], start,
                    temperature, lse_t[sl], entropy_t[sl],
                    None if g_lp_t is None else g_lp_t[sl].float(),
                    None if g_h_t is None else g_h_t[sl].float(), blk, tmp_a, tmp_b)
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
# The chunk's logits are computed transposed, [v, t] = weight @ hidden.T: on the CPU this
# matmul runs faster than hidden @ weight.T, and the vocabulary blocks of the elementwise
# passes are then contiguous rows.
def _ld(c: int) -> int:
    """Row stride of a chunk of ``c`` tokens: a multiple of 16 values (a stride that is not a
    whole number of cache lines slows the CPU matmul down by a third)."""
    return -(-max(c, 1) // 16) * 16


def _chunk_logits(h_ch, w_vh, buf, low_buf):
    """fp32 logits [n_valid, c] of one chunk, a view of ``buf`` with row stride ``_ld(c)``
    (matmul in the parameter dtype)."""
    n_valid, c = w_vh.shape[0], h_ch.shape[0]
    ld = _ld(c)
    z_vt = buf[:n_valid * ld].view(n_valid, ld)[:, :c]
    h_t = h_ch.to(w_vh.dtype).t()
    if w_vh.dtype == torch.float32:
        return torch.mm(w_vh, h_t, out=z_vt)
    low = low_buf[:n_valid * ld].view(n_valid, ld)[:, :c]
    return z_vt.copy_(torch.mm(w_vh, h_t, out=low))


def _spans(n_tok: int, v_local: int, chunk_size, keep_tok: int, dev) -> list:
    """Token ranges of the chunks: the first ``n_tok - keep_tok`` tokens in equal chunks,
    then the kept tail as one chunk. Only padded widths enter, so every TP rank agrees."""
    head = n_tok - keep_tok
    chunk = _chunk_len(chunk_size, v_local, head, dev)
    spans = [(s, min(s + chunk, head)) for s in range(0, head, chunk)]
    return spans + ([(head, n_tok)] if keep_tok else [])


def _logits_buffers(width, n_valid, dtype, dev):
    """The logits of a chunk of up to ``width`` tokens (and the parameter-dtype matmul
    output)."""
    z_buf = _scratch(_ld(width) * n_valid, dev)
    low = None if dtype == torch.float32 else torch.empty(_ld(width) * n_valid, dtype=dtype,
                                                         device=dev)
    return z_buf, low


def _block_scratch(spans, n_valid, dev) -> torch.Tensor:
    """One elementwise block of the largest chunk (each chunk has its own block length)."""
    return _scratch(max(((e - s) * min(_block_len(e - s, n_valid, dev), n_valid)
                         for s, e in spans), default=1), dev)


def _keep_len(keep_bytes: Optional[int], n_tok: int, v_local: int, hidden: int, dtype) -> int:
    """Tokens whose logits the forward keeps for the backward. Default: as many bytes as the
    fp32 weight gradient the backward allocates anyway, so the peak stays independent of the
    token count (at most about twice that gradient plus one chunk) and the last
    min(T, h) tokens (fp32; bf16 keeps a bf16 copy too: 2h/3) skip the recomputing matmul."""
    per_tok = v_local * (4 + (0 if dtype == torch.float32 else dtype.itemsize))
    budget = 4 * v_local * hidden if keep_bytes is None else keep_bytes
    if budget < 0:
        raise ValueError(f"keep_bytes must be >= 0, got {keep_bytes}")
    return min(n_tok, budget // max(per_tok, 1))


class _ParamGrads:
    """d loss / d hidden and d loss / d weight (fp32), filled one chunk of tokens at a time from
    the chunk's logits gradient; the matmuls run in the parameter dtype (tensor cores) and
    accumulate in fp32."""

    def __init__(self, hidden_th, weight_vh, n_valid: int, width: int, needs):
        self.hidden_th, self.weight_vh, self.n_valid = hidden_th, weight_vh, n_valid
        self.w_vh = weight_vh[:n_valid]
        self.dev = dev = hidden_th.device
        self.fp32 = weight_vh.dtype == torch.float32
        n_tok = hidden_th.shape[0]
        # every row is written by add_chunk (the first chunk's weight gradient is a plain
        # matmul); padded rows and empty shards are zero
        self.h = torch.empty(hidden_th.shape, dtype=torch.float32, device=dev) \
            if needs[0] else None
        self.w = torch.empty(weight_vh.shape, dtype=torch.float32, device=dev) \
            if needs[1] else None
        if self.w is not None:
            self.w[n_valid:].zero_()
            if n_valid == 0 or n_tok == 0:
                self.w.zero_()
        if self.h is not None and n_valid == 0:
            self.h.zero_()
        # d loss / d hidden of a chunk, transposed: weight.T @ grad is the faster CPU matmul
        self.gh_buf = _scratch(hidden_th.shape[1] * width, dev) \
            if self.h is not None and self.fp32 else None
        self.first = True

    def reset(self) -> None:
        self.first = True

    def add_chunk(self, g_vt, sl: slice, low) -> None:
        """Tokens ``sl``: their logits gradient ``g_vt`` [n_valid, c] (fp32, may be the
        chunk's logits buffer)."""
        h_ch, w_vh = self.hidden_th[sl], self.w_vh
        if not self.fp32:
            g_vt = _like(low, g_vt).copy_(g_vt)
        if self.h is not None:
            if self.fp32:
                gh_ht = self.gh_buf[:w_vh.shape[1] * h_ch.shape[0]].view(w_vh.shape[1], -1)
                self.h[sl] = torch.mm(w_vh.t(), g_vt, out=gh_ht).t()
            else:
                self.h[sl] = g_vt.t() @ w_vh
        if self.w is not None:
            dst = self.w[:self.n_valid]
            if self.fp32 and h_ch.dtype == torch.float32:
                if self.first:
                    torch.mm(g_vt, h_ch, out=dst)
                else:
                    dst.addmm_(g_vt, h_ch)
            else:
                prod = (g_vt @ h_ch.to(g_vt.dtype)).float()
                if self.first:
                    dst.copy_(prod)
                else:
                    dst += prod
        self.first = False

    def finish(self, reduce_group):
        """(grad hidden, grad weight) in the inputs' dtypes; ``reduce_group``: all-reduce
        d loss / d hidden over it (each shard holds its vocabulary's part)."""
        self.gh_buf = None
        if self.h is not None and reduce_group is not None:
            _all_reduce(self.h, dist.ReduceOp.SUM, reduce_group)
        return (None if self.h is None else self.h.to(self.hidden_th.dtype),
                None if self.w is None else self.w.to(self.weight_vh.dtype))


class _LinearVocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_th, weight_vh, targets_t, vocab_size, temperature, chunk_size,
                group, entropy_grad, reduce_hidden_grad, keep_tok):
        n_tok = hidden_th.shape[0]
        dev = hidden_th.device
        start, n_valid = _shard_range(weight_vh.shape[0], vocab_size, group)
        spans = _spans(n_tok, weight_vh.shape[0], chunk_size, keep_tok, dev)
        w_vh = weight_vh[:n_valid]  # padded rows are never multiplied
        width = max((e - s for s, e in spans), default=1)
        z_buf, low = _logits_buffers(width, n_valid, weight_vh.dtype, dev)
        tmp_b = _block_scratch(spans, n_valid, dev)
        # the kept tail's shifted logits go to a block of their own: its logits stay intact
        tmp_a = _block_scratch(spans[-1:], n_valid, dev) if keep_tok else None
        stats = torch.empty(4, n_tok, dtype=torch.float32, device=dev)
        for s, e in spans:
            z_vt = _chunk_logits(hidden_th[s:e], w_vh, z_buf, low)
            kept_here = keep_tok and e == n_tok
            out = _forward_stats(z_vt, 0, targets_t[s:e], start, temperature, group,
                                 _block_len(e - s, n_valid, dev), tmp_a if kept_here else None,
                                 tmp_b)
            for row, x in enumerate(out):
                stats[row, s:e] = x
        # the kept tail's logits (and the scratch they live in) wait for the backward: a plain
        # attribute, so saved-tensor hooks (offload to CPU) do not see them
        ctx.kept = (z_buf, low) if keep_tok and n_valid else None
        del z_buf, tmp_a, tmp_b, low
        m_t, log_s_t, entropy_t, logp_t = stats
        ctx.save_for_backward(hidden_th, weight_vh, targets_t, m_t + log_s_t, entropy_t)
        ctx.cfg = (start, n_valid, spans, width, temperature, group, reduce_hidden_grad)
        ctx.set_materialize_grads(False)
        logp_t, entropy_out_t = logp_t.clone(), entropy_t.clone()
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_out_t)
        return logp_t, entropy_out_t

    @staticmethod
    def backward(ctx, g_lp_t, g_h_t):
        hidden_th, weight_vh, targets_t, lse_t, entropy_t = ctx.saved_tensors
        start, n_valid, spans, width, temperature, group, reduce_hidden_grad = ctx.cfg
        kept, ctx.kept = ctx.kept, None
        if g_lp_t is None and g_h_t is None:
            return (None,) * 10
        grads = _ParamGrads(hidden_th, weight_vh, n_valid, width, ctx.needs_input_grad[:2])
        z_buf, low = kept if kept is not None else _logits_buffers(width, n_valid,
                                                                   weight_vh.dtype, grads.dev)
        tmp = _block_scratch(spans, n_valid, grads.dev)
        # the last chunk first: with a kept tail its logits are still in the scratch
        for i, (s, e) in enumerate(reversed(spans) if n_valid else ()):
            sl = slice(s, e)
            if i == 0 and kept is not None:
                z_vt = z_buf[:n_valid * _ld(e - s)].view(n_valid, _ld(e - s))[:, :e - s]
            else:
                z_vt = _chunk_logits(hidden_th[sl], grads.w_vh, z_buf, low)
            _grad_z(z_vt, 0, z_vt, targets_t[sl], start, temperature, lse_t[sl], entropy_t[sl],
                    None if g_lp_t is None else g_lp_t[sl].float(),
                    None if g_h_t is None else g_h_t[sl].float(),
                    _block_len(e - s, n_valid, grads.dev), None, tmp)
            grads.add_chunk(z_vt, sl, low)
        del z_buf, tmp, low, kept
        grad_h, grad_w = grads.finish(group if reduce_hidden_grad else None)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def linear_vocab_parallel_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                          targets: torch.Tensor, *,
                                          vocab_size: Optional[int] = None, tp_group=None,
                                          temperature: float = 1.0,
                                          chunk_size: Optional[int] = None,
                                          entropy_grad: bool = True,
                                          reduce_hidden_grad: bool = True,
                                          keep_bytes: Optional[int] = None):
    """Log-prob and entropy of ``hidden @ weight.T`` without materialising the logits.

    hidden: [..., h], the same on every TP rank. weight: [V/tp, h], this rank's vocabulary
    shard of the output layer (rows past ``vocab_size`` are padding, never used).
    Logits exist for one chunk of tokens at a time and are recomputed in backward, except
    the last tokens' (up to ``keep_bytes`` of logits; default: the size of the fp32 weight
    gradient, and at most ``chunk_size`` tokens when that is given; 0: none), which the
    forward keeps when a backward will follow.
    reduce_hidden_grad: all-reduce d loss / d hidden over ``tp_group`` (each rank holds
    only its vocabulary's part); pass False when the caller's own collective already sums
    it (e.g. the reduce-scatter of a sequence-parallel gather).
    Other arguments and the result as in :func:`vocab_parallel_logprob_entropy`.
    """
    lead = targets.shape
    hidden_th = _flat(hidden, 1)
    training = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep_tok = _keep_len(keep_bytes, hidden_th.shape[0], weight.shape[0], weight.shape[1],
                         weight.dtype) if training else 0
    if keep_bytes is None and chunk_size is not None:  # a chunk size given bounds it too
        keep_tok = min(keep_tok, chunk_size)
    logp, ent = _LinearVocabParallelLogProbEntropy.apply(
        hidden_th, weight, _flat(targets, 0).long(), vocab_size, float(temperature),
        chunk_size, tp_group, entropy_grad, reduce_hidden_grad, keep_tok)
    return logp.view(lead), ent.view(lead)


# --------------------------------------------------------------------------- loss in the kernel
# A loss that is a sum of per-token terms, l = sum_t f_t(log p_t, H_t), has per-token
# gradients that depend on the token's own (log p_t, H_t) only. Those are known as soon as a
# chunk's statistics are, so the forward can turn the chunk's logits into their gradient
# while they are in memory and multiply it into d hidden and d weight: three output-layer
# matmuls in all instead of four (the logits are never recomputed), and the backward only
# scales the two stored gradients by the incoming scalar.
_NOT_SEPARABLE_WARNED = []


def _token_grads(token_loss, logp_t, entropy_t, entropy_grad: bool):
    """(loss, d loss / d logp, d loss / d H or None) of ``token_loss`` at these values (fp32)."""
    with torch.enable_grad():
        lp = logp_t.detach().clone().requires_grad_()
        ent = entropy_t.detach().clone().requires_grad_(entropy_grad)
        loss = token_loss(lp, ent)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ValueError("token_loss must return a scalar tensor (the sum of per-token "
                             f"terms), got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        inputs = (lp, ent) if entropy_grad else (lp,)
        grads = (torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad
                 else (None,) * len(inputs))
    g_lp = torch.zeros_like(lp) if grads[0] is None else grads[0].float()
    g_h = grads[1].float() if entropy_grad and grads[1] is not None else None
    return loss.detach().float(), g_lp.detach(), None if g_h is None else g_h.detach()


class _LinearVocabParallelTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_th, weight_vh, targets_t, vocab_size, temperature, chunk_size,
                group, entropy_grad, reduce_hidden_grad, token_loss, misses):
        n_tok, dev = hidden_th.shape[0], hidden_th.device
        start, n_valid = _shard_range(weight_vh.shape[0], vocab_size, group)
        if chunk_size is None:
            # chunks as large as the plain kernel's kept tail (the fp32 weight gradient's
            # bytes; at least its default chunk): the same peak, and few loss evaluations
            v_local = weight_vh.shape[0]
            chunk_size = _equal_chunks(n_tok, max(
                _chunk_len(None, v_local, n_tok, dev),
                _keep_len(None, n_tok, v_local, weight_vh.shape[1], weight_vh.dtype)))
        spans = _spans(n_tok, weight_vh.shape[0], chunk_size, 0, dev)
        width = max((e - s for s, e in spans), default=1)
        z_buf, low = _logits_buffers(width, n_valid, weight_vh.dtype, dev)
        # the shifted logits go to tmp_a: each chunk's logits stay intact for its gradient
        tmp_a, tmp_b = (_block_scratch(spans, n_valid, dev) for _ in range(2))
        grads = _ParamGrads(hidden_th, weight_vh, n_valid, width, ctx.needs_input_grad[:2])
        stats = torch.zeros(4, n_tok, dtype=torch.float32, device=dev)
        given = torch.zeros(2, n_tok, dtype=torch.float32, device=dev)  # the gradients used
        m_t, log_s_t, entropy_t, logp_t = stats

        def chunk_grad(s, e, g_lp_t, g_h_t, z_vt):
            if grads.h is None and grads.w is None:  # nothing asks for a gradient
                return
            blk = _block_len(e - s, n_valid, dev)
            _grad_z(z_vt, 0, z_vt, targets_t[s:e], start, temperature,
                    m_t[s:e] + log_s_t[s:e], entropy_t[s:e], g_lp_t[s:e],
                    None if g_h_t is None else g_h_t[s:e], blk, None, tmp_b)
            grads.add_chunk(z_vt, slice(s, e), low)

        for s, e in spans:
            z_vt = _chunk_logits(hidden_th[s:e], grads.w_vh, z_buf, low)
            out = _forward_stats(z_vt, 0, targets_t[s:e], start, temperature, group,
                                 _block_len(e - s, n_valid, dev), tmp_a, tmp_b)
            for row, x in enumerate(out):
                stats[row, s:e] = x
            # the other tokens' values are placeholders: a sum of per-token terms does not
            # read them for these tokens' gradients (checked once all tokens are known)
            _, g_lp_t, g_h_t = _token_grads(token_loss, logp_t, entropy_t, entropy_grad)
            given[0, s:e] = g_lp_t[s:e]
            if g_h_t is not None:
                given[1, s:e] = g_h_t[s:e]
            if n_valid:
                chunk_grad(s, e, g_lp_t, g_h_t, z_vt)
        loss, g_lp_t, g_h_t = _token_grads(token_loss, logp_t, entropy_t, entropy_grad)
        final = torch.stack([g_lp_t, torch.zeros_like(g_lp_t) if g_h_t is None else g_h_t])
        # bit patterns: exact, and a NaN gradient (a step to skip) matches itself
        mismatch = (given.view(torch.int32) != final.view(torch.int32)).sum()
        if misses is not None:  # the caller checks it with its own host sync
            misses.add_(mismatch)
        elif mismatch.item():
            # some token's gradient read other tokens: recompute every chunk with the
            # gradients at the final values (exact; the cost of the plain kernel's backward)
            if not _NOT_SEPARABLE_WARNED:
                _NOT_SEPARABLE_WARNED.append(True)
                import warnings
                warnings.warn("token_loss is not a sum of per-token terms (a token's gradient "
                              "changed once other tokens were known): every chunk is "
                              "recomputed in the forward. Pass such a loss to "
                              "linear_vocab_parallel_logprob_entropy's outputs instead.")
            grads.reset()
            for s, e in spans if n_valid else ():
                chunk_grad(s, e, g_lp_t, g_h_t,
                           _chunk_logits(hidden_th[s:e], grads.w_vh, z_buf, low))
        z_buf = low = tmp_a = tmp_b = None  # (the chunk closure holds the names)
        grad_h, grad_w = grads.finish(group if reduce_hidden_grad else None)
        ctx.save_for_backward(grad_h, grad_w)
        logp_out_t, entropy_out_t = logp_t.clone(), entropy_t.clone()
        ctx.mark_non_differentiable(logp_out_t, entropy_out_t)
        return loss, logp_out_t, entropy_out_t

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_h):
        grad_h, grad_w = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 11
        # in place: the stored gradients are this call's own, and a copy of the weight
        # gradient would double its bytes at the peak (a second backward through this
        # graph is refused by autograd's version check)
        return (None if grad_h is None else grad_h.mul_(g_loss.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(g_loss.to(grad_w.dtype)),
                None, None, None, None, None, None, None, None, None)


def linear_vocab_parallel_token_loss(hidden: torch.Tensor, weight: torch.Tensor,
                                     targets: torch.Tensor, token_loss, *,
                                     vocab_size: Optional[int] = None, tp_group=None,
                                     temperature: float = 1.0,
                                     chunk_size: Optional[int] = None,
                                     entropy_grad: bool = True,
                                     reduce_hidden_grad: bool = True,
                                     misses: Optional[torch.Tensor] = None):
    """``token_loss(logp, entropy)`` of ``hidden @ weight.T`` with its gradient computed in
    the forward: three output-layer matmuls instead of the plain kernel's four.

    token_loss: takes the fp32 log-probs and entropies of all tokens, in the shape of
    ``targets``, and returns the scalar loss; it must be a sum of per-token terms (masks,
    weights and normalisers are constants or detached). It is evaluated once per chunk and
    once at the end, on every TP rank alike. A loss whose per-token gradients read other
    tokens is detected (one host sync) and still gets the exact gradient, by a second pass
    (with a warning). misses: a device scalar instead; the count of tokens whose gradient
    was wrong is added to it, with no host sync and no second pass, and the caller must
    check it is 0 before using the gradients (the trainer does, once per step).
    Returns (loss, logp, entropy): the loss carries the gradient to ``hidden`` and
    ``weight``; logp and entropy are values for metrics, without gradient.
    Other arguments as in :func:`linear_vocab_parallel_logprob_entropy`.
    """
    lead = targets.shape

    def flat_loss(lp_t, ent_t):
        return token_loss(lp_t.view(lead), ent_t.view(lead))

    loss, logp, ent = _LinearVocabParallelTokenLoss.apply(
        _flat(hidden, 1), weight, _flat(targets, 0).long(), vocab_size, float(temperature),
        chunk_size, tp_group, entropy_grad, reduce_hidden_grad, flat_loss, misses)
    return loss, logp.view(lead), ent.view(lead)
