"""SGLang rollout estimate: a server GPU's memory (bf16 weights / server TP + a KV cache of
2 * L * g * d * 2 bytes per token, in a pool of --mem-fraction-static chosen per plan within
the headroom), how many sequences it decodes at once, and how long generating a step's
responses takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from srft_mcore.config import sglang_mem_fraction
from srft_mcore.planning.model_shape import ModelShape, hf_param_count
from srft_mcore.planning.run_shape import GB, GIB, Assumptions, Hardware, RunShape


def kv_bytes_per_token(m: ModelShape, server_tp: int = 1) -> int:
    """bf16 KV cache per token on one server GPU: 2 (k, v) * L * g * d * 2 bytes, the
    key/value heads split over the server's TP (replicated when TP > g)."""
    heads = max(1, math.ceil(m.kv_heads / server_tp))
    return 2 * m.layers * heads * m.head_dim * 2


def sglang_weight_bytes(m: ModelShape, server_tp: int) -> int:
    """bf16 weights on one server GPU: 2 * params / server TP."""
    return 2 * hf_param_count(m) // server_tp


@dataclass
class RolloutPlan:
    mode: str
    """dedicated | colocated."""
    gpus: int
    server_tp: int
    servers: int
    fits: bool
    kv_gb_per_gpu: float
    concurrent_seqs: int
    """Sequences a server decodes at once (all its KV room can hold at full length)."""
    seconds: float
    why: str = ""
    mem_fraction: float = 0.0
    """SGLang --mem-fraction-static the plan assumes (rollout.mem_fraction)."""
    peak_gb: float = 0.0
    """A server GPU's peak during generation: mem_fraction * GPU (its weights, KV pool and
    context, plus what a colocated trainer keeps there) + SGLang's runtime memory."""
    trainer_resident_gb: float = 0.0
    """Colocated: what the trainer keeps on each GPU during generation."""
    servers_per_node: int = 0
    """Servers on one node (each server inside a node)."""


def kv_budget_bytes(m: ModelShape, server_tp: int, hw: Hardware, a: Assumptions,
                    trainer_resident: int = 0, colocated: bool = False,
                    fraction: Optional[float] = None) -> int:
    """KV cache room on a server GPU, as SGLang sizes its pool from the free memory:
    fraction * GPU memory - weights / TP - its own CUDA context (sglang_residual_gib) -
    what a colocated trainer keeps resident. ``fraction`` None: the trainer's default by
    placement (0.85 dedicated, 0.6 colocated) or the one of the assumptions."""
    if fraction is None:
        fraction = sglang_mem_fraction(a.sglang_mem_fraction, colocated)
    return int(fraction * hw.gpu_mem_gb * GB - sglang_weight_bytes(m, server_tp)
               - a.sglang_residual_gib * GIB - trainer_resident)


def max_mem_fraction(hw: Hardware, a: Assumptions) -> float:
    """The largest pool fraction within the headroom: SGLang's runtime memory comes on top
    of the pool, so fraction <= max_mem_frac - sglang_runtime / GPU memory (2 decimals,
    rounded down)."""
    return math.floor(100 * (hw.max_mem_frac - a.sglang_runtime_gib * GIB
                             / (hw.gpu_mem_gb * GB)) + 1e-9) / 100


def choose_mem_fraction(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
                        server_tp: int, servers: int, trainer_resident: int) -> float:
    """The plan's --mem-fraction-static: the one given (--sglang-mem-fraction), else just
    enough for the KV its servers can use (each of its requests in flight at full length:
    min(its share of the step's sequences, max_requests_per_server * n)) on top of the
    weights, context and colocated trainer, rounded up to 2 decimals, at most
    :func:`max_mem_fraction`. A smaller pool leaves more memory free; a larger one than the
    step can fill buys nothing."""
    if a.sglang_mem_fraction is not None:
        return a.sglang_mem_fraction
    cap = max_mem_fraction(hw, a)
    share = math.ceil(run.prompts_per_step * run.n_samples / max(1, servers))
    need_seqs = min(share, a.max_requests_per_server * run.n_samples)
    need = (need_seqs * run.seq_len * kv_bytes_per_token(m, server_tp)
            + sglang_weight_bytes(m, server_tp) + a.sglang_residual_gib * GIB
            + trainer_resident)
    return min(cap, math.ceil(100 * need / (hw.gpu_mem_gb * GB) - 1e-9) / 100)


def decode_step_seconds(m: ModelShape, server_tp: int, batch: int, context: float,
                        hw: Hardware, a: Assumptions) -> float:
    """One decode step of ``batch`` sequences at mean ``context`` tokens: reading the
    weights and the batch's KV cache from HBM, or the FLOPs (2 * params * batch), whichever
    is slower, plus a fixed per-step overhead."""
    bytes_read = sglang_weight_bytes(m, server_tp) + batch * context * kv_bytes_per_token(
        m, server_tp)
    memory_s = bytes_read / (hw.hbm_gbps * GB * a.decode_bw_eff)
    flops_s = 2 * hf_param_count(m) * batch / server_tp / (
        hw.peak_tflops * 1e12 * a.decode_flops_eff)
    overhead = a.decode_step_overhead_s + (2 * m.layers * 10e-6 if server_tp > 1 else 0.0)
    return max(memory_s, flops_s) + overhead


def rollout_plan(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, gpus: int,
                 server_tp: int, trainer_resident: int = 0,
                 colocated: bool = False) -> RolloutPlan:
    """Servers of ``server_tp`` GPUs on ``gpus`` GPUs generating prompts * n responses.

    The pool fraction comes from :func:`choose_mem_fraction`; a plan does not fit when the
    server GPU's peak (fraction * GPU + sglang_runtime_gib) exceeds max_mem_frac * GPU or
    the pool holds no full-length sequence. Each server takes an equal share; it runs waves
    of as many sequences as its KV room holds at full length (prompt + response) and the
    request limit allows. A wave is ``response_len`` decode steps at mean context prompt +
    response / 2 (every response assumed to run to the limit), after a prefill of
    2 * params * prompt tokens."""
    mode = "colocated" if colocated else "dedicated"
    servers = gpus // server_tp
    fraction = choose_mem_fraction(m, run, hw, a, server_tp, servers, trainer_resident)
    budget = kv_budget_bytes(m, server_tp, hw, a, trainer_resident, colocated, fraction)
    seq_kv = run.seq_len * kv_bytes_per_token(m, server_tp)
    room = max(0, budget) // seq_kv
    share = math.ceil(run.prompts_per_step * run.n_samples / servers)
    batch = int(min(share, room, a.max_requests_per_server * run.n_samples))
    peak = fraction * hw.gpu_mem_gb * GB + a.sglang_runtime_gib * GIB
    base = dict(mode=mode, gpus=gpus, server_tp=server_tp, servers=servers,
                kv_gb_per_gpu=round(max(0, budget) / GB, 1), concurrent_seqs=batch,
                mem_fraction=fraction, peak_gb=round(peak / GB, 1),
                trainer_resident_gb=round(trainer_resident / GB, 1),
                servers_per_node=min(servers, max(1, hw.gpus_per_node // server_tp)))
    if peak > hw.cap_bytes + 1:
        why = (f"sglang: --mem-fraction-static {fraction:g} x {hw.gpu_mem_gb:g} GB + runtime "
               f"{a.sglang_runtime_gib * GIB / GB:.1f} GB = {peak / GB:.1f} GB > "
               f"{hw.max_mem_frac:g} x {hw.gpu_mem_gb:g} GB. Fix: --sglang-mem-fraction <= "
               f"{max_mem_fraction(hw, a):g}, or leave it unset")
        return RolloutPlan(fits=False, seconds=math.inf, why=why, **base)
    if batch < 1:
        context = a.sglang_residual_gib * GIB
        used = sglang_weight_bytes(m, server_tp) + context + trainer_resident
        what = (f"SGLang weights {sglang_weight_bytes(m, server_tp) / GB:.1f} GB/GPU + "
                f"context {context / GB:.1f} GB"
                + (f" + trainer-resident {trainer_resident / GB:.1f} GB (offload "
                   f"{a.offload})" if colocated else ""))
        why = (f"sglang: {what} = {used / GB:.1f} GB leave room for "
               f"{max(0, budget) / GB:.1f} GB of KV in SGLang's "
               f"{fraction:g} x {hw.gpu_mem_gb:g} GB pool; one {run.seq_len}-token "
               f"sequence needs {seq_kv / GB:.2f} GB")
        return RolloutPlan(fits=False, seconds=math.inf, why=why, **base)
    waves = math.ceil(share / batch)
    step = decode_step_seconds(m, server_tp, batch, run.prompt_len + run.response_len / 2,
                               hw, a)
    prefill = 2 * hf_param_count(m) * run.prompt_len * share / server_tp / (
        hw.peak_tflops * 1e12 * a.decode_flops_eff)
    return RolloutPlan(fits=True, seconds=waves * run.response_len * step + prefill, **base)
