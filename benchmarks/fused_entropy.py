"""Memory and time of per-token log-prob + entropy, forward + backward; prints JSON.

Paths: (a) naive: full logits, log_softmax, softmax, entropy (from hidden states through
the output matmul, and from given logits); (b) the chunked kernel on given logits, with
(a-logits) as its baseline; (c) the linear-fused kernel on hidden states and the output
weight, with (a-hidden) as its baseline; (d) the same with the loss in the kernel (its
gradient formed in the forward, as the trainer runs it), baseline (a-hidden). Every path
ends in the same scalar loss sum(logp) + sum(entropy) and its backward.

Memory is the peak extra over what the inputs already hold: on CUDA from the allocator's
peak; on CPU from the process RSS sampled every millisecond in a thread (glibc returns large
blocks to the OS on free, so the RSS follows the tensors). TP2 runs two real gloo ranks,
each with half the vocabulary; each rank reports its own figures (rank 0 printed).

    python benchmarks/fused_entropy.py [--tokens 4096] [--vocab 151936] [--hidden 896]
        [--tp 1 2] [--dtype float32] [--repeat 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra bytes during the block (CUDA allocator, else sampled RSS)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = _rss()
        self.top = self.base
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.top = max(self.top, _rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.top = max(self.top, _rss())
            self.stop.set()
            self.thread.join()
            self.peak = self.top - self.base


def _naive(hidden, weight, logits, targets, vocab, group):
    """Full-vocabulary path on this rank's shard, with the same TP reductions done plainly."""
    import torch.distributed as dist

    z = (hidden @ weight.t() if logits is None else logits).float()
    start = (dist.get_rank(group) if group is not None else 0) * z.shape[-1]
    if group is None:
        logp_all = torch.log_softmax(z[:, :vocab], dim=-1)
        p = torch.softmax(z[:, :vocab], dim=-1)
        ent = -(p * logp_all).sum(-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return logp, ent
    # TP: the textbook vocab-parallel version (global max/sum via differentiable all-reduce)
    from torch.distributed.nn.functional import all_reduce

    n_valid = max(0, min(z.shape[-1], vocab - start))
    z = z[:, :n_valid]
    m = z.detach().max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    s = all_reduce(e.sum(-1, keepdim=True), group=group)
    logp_all = z - m - s.log()
    p = e / s
    ent = -all_reduce((p * logp_all).sum(-1), group=group)
    local = targets - start
    ok = (local >= 0) & (local < n_valid)
    picked = logp_all.gather(-1, local.clamp(0, max(n_valid - 1, 0)).unsqueeze(-1)).squeeze(-1)
    logp = all_reduce(torch.where(ok, picked, torch.zeros_like(picked)), group=group)
    return logp, ent


def _measure(fn, hidden, weight, logits, device, repeat):
    times, peaks = [], []
    for _ in range(repeat):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        z = None if logits is None else logits.detach().requires_grad_()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            loss = fn(h, w, z)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            del loss
            h.grad = w.grad = None
            if z is not None:
                z.grad = None
        times.append(dt)
        peaks.append(mem.peak)
    return {"time_s": round(min(times), 3), "peak_extra_gib": round(max(peaks) / 2**30, 3)}


def run(tokens, vocab, hidden_size, dtype_name, repeat, tp):
    import torch.distributed as dist

    from srft_mcore.models.builder import padded_vocab_size
    from srft_mcore.ops import linear_vocab_parallel_logprob_entropy as fused_linear
    from srft_mcore.ops import linear_vocab_parallel_token_loss as fused_loss
    from srft_mcore.ops import vocab_parallel_logprob_entropy as chunked

    group = None
    rank = 0
    if tp > 1:
        # the ranks share the machine's cores
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_process_group("gloo")
        group, rank = dist.group.WORLD, dist.get_rank()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    padded = padded_vocab_size(vocab, 128, tp)
    v_local = padded // tp
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(v_local, hidden_size, generator=g) * 0.05).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    with torch.no_grad():
        logits = hidden @ weight.t()

    def total(pair):
        return pair[0].sum() + pair[1].sum()

    paths = {
        "a_naive_from_hidden": lambda h, w, z, t: total(_naive(h, w, None, t, vocab, group)),
        "a_naive_from_logits": lambda h, w, z, t: total(_naive(None, None, z, t, vocab, group)),
        "b_chunked": lambda h, w, z, t: total(chunked(z, t, vocab_size=vocab, tp_group=group)),
        "c_linear_fused": lambda h, w, z, t: total(fused_linear(h, w, t, vocab_size=vocab,
                                                                tp_group=group)),
        "d_linear_fused_loss": lambda h, w, z, t: fused_loss(
            h, w, t, lambda lp, ent: lp.sum() + ent.sum(), vocab_size=vocab,
            tp_group=group)[0],
    }
    out = {}
    for name, fn in paths.items():
        z = logits if "logits" in name or name.startswith("b") else None
        # warm-up on a slice (thread pools, first-touch allocations), then the measurement
        _measure(lambda h, w, zz: fn(h, w, zz, targets[:64]), hidden[:64], weight,
                 None if z is None else z[:64], device, 1)
        out[name] = _measure(lambda h, w, zz: fn(h, w, zz, targets), hidden, weight, z,
                             device, repeat)
    a_h, a_l = out["a_naive_from_hidden"], out["a_naive_from_logits"]
    out["ratios"] = {
        "c_vs_a_memory": round(out["c_linear_fused"]["peak_extra_gib"] /
                               max(a_h["peak_extra_gib"], 1e-9), 4),
        "c_vs_a_time": round(out["c_linear_fused"]["time_s"] / a_h["time_s"], 3),
        "d_vs_a_memory": round(out["d_linear_fused_loss"]["peak_extra_gib"] /
                               max(a_h["peak_extra_gib"], 1e-9), 4),
        "d_vs_a_time": round(out["d_linear_fused_loss"]["time_s"] / a_h["time_s"], 3),
        "b_vs_a_memory": round(out["b_chunked"]["peak_extra_gib"] /
                               max(a_l["peak_extra_gib"], 1e-9), 4),
        "b_vs_a_time": round(out["b_chunked"]["time_s"] / a_l["time_s"], 3),
    }
    out.update(rank=rank, tp=tp, tokens=tokens, vocab=vocab, padded_vocab=padded,
               vocab_per_rank=v_local, hidden=hidden_size, dtype=dtype_name,
               device=str(device), threads=torch.get_num_threads())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    results = []
    for tp in args.tp:
        a = (args.tokens, args.vocab, args.hidden, args.dtype, args.repeat, tp)
        if tp == 1:
            results.append(run(*a))
        else:
            from srft_mcore.launching.local import spawn_ranks

            threads = str(max(1, torch.get_num_threads() // tp))
            results.append(spawn_ranks(run, tp, a, timeout_s=1800,
                                       env={"OMP_NUM_THREADS": threads,
                                            "PYTHONWARNINGS": "ignore"})[0])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
