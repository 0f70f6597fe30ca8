"""SGLang rollout estimate: a server GPU's memory (bf16 weights / server TP + a KV cache of
2 * L * g * d * 2 bytes per token), how many sequences it decodes at once, and how long
generating a step's responses takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def kv_budget_bytes(m: ModelShape, server_tp: int, hw: Hardware, a: Assumptions,
                    trainer_resident: int = 0, colocated: bool = False) -> int:
    """KV cache room on a server GPU, as SGLang sizes its pool from the free memory:
    fraction * GPU memory - weights / TP - its own CUDA context (sglang_residual_gib) -
    what a colocated trainer keeps resident."""
    fraction = sglang_mem_fraction(a.sglang_mem_fraction, colocated)
    return int(fraction * hw.gpu_mem_gb * GB - sglang_weight_bytes(m, server_tp)
               - a.sglang_residual_gib * GIB - trainer_resident)


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

    Each server takes an equal share; it runs waves of as many sequences as its KV room
    holds at full length (prompt + response) and the request limit allows. A wave is
    ``response_len`` decode steps at mean context prompt + response / 2 (every response
    assumed to run to the limit), after a prefill of 2 * params * prompt tokens."""
    mode = "colocated" if colocated else "dedicated"
    servers = gpus // server_tp
    budget = kv_budget_bytes(m, server_tp, hw, a, trainer_resident, colocated)
    seq_kv = run.seq_len * kv_bytes_per_token(m, server_tp)
    room = max(0, budget) // seq_kv
    share = math.ceil(run.prompts_per_step * run.n_samples / servers)
    batch = int(min(share, room, a.max_requests_per_server * run.n_samples))
    base = dict(mode=mode, gpus=gpus, server_tp=server_tp, servers=servers,
                kv_gb_per_gpu=round(max(0, budget) / GB, 1), concurrent_seqs=batch)
    if batch < 1:
        context = a.sglang_residual_gib * GIB
        used = sglang_weight_bytes(m, server_tp) + context + trainer_resident
        what = (f"SGLang weights {sglang_weight_bytes(m, server_tp) / GB:.1f} GB/GPU + "
                f"context {context / GB:.1f} GB"
                + (f" + trainer-resident {trainer_resident / GB:.1f} GB" if colocated else ""))
        why = (f"sglang: {what} = {used / GB:.1f} GB leave room for "
               f"{max(0, budget) / GB:.1f} GB of KV in SGLang's "
               f"{sglang_mem_fraction(a.sglang_mem_fraction, colocated):g} x "
               f"{hw.gpu_mem_gb:g} GB pool; one {run.seq_len}-token sequence needs "
               f"{seq_kv / GB:.2f} GB")
        return RolloutPlan(fits=False, seconds=math.inf, why=why, **base)
    waves = math.ceil(share / batch)
    step = decode_step_seconds(m, server_tp, batch, run.prompt_len + run.response_len / 2,
                               hw, a)
    prefill = 2 * hf_param_count(m) * run.prompt_len * share / server_tp / (
        hw.peak_tflops * 1e12 * a.decode_flops_eff)
    return RolloutPlan(fits=True, seconds=waves * run.response_len * step + prefill, **base)
