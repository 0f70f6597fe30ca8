"""Step time: the trainer's compute (FLOPs at an assumed MFU, the pipeline bubble), its
gradient sync, the weight sync to SGLang, and how the phases of a step add up.
"""
from __future__ import annotations

import math

from srft_mcore.planning.memory_estimate import micro_batches_per_rank
from srft_mcore.planning.model_shape import (ModelShape, dense_matmul_params, hf_param_count,
                                             stage_params)
from srft_mcore.planning.run_shape import DTYPE_BYTES, GB, Assumptions, Hardware, Layout, RunShape


def trainer_mfu(tp: int, hw: Hardware, a: Assumptions) -> float:
    """Assumed MFU: base / (1 + loss * log2 t), halved when a TP group spans nodes."""
    mfu = a.mfu / (1 + a.mfu_tp_loss * math.log2(tp))
    return mfu * (a.mfu_cross_node_tp if tp > hw.gpus_per_node else 1.0)


def pipeline_bubble(pp: int, m_batches: int) -> float:
    """1F1B idle fraction: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (m_batches + pp - 1)


def forward_flops_per_token(m: ModelShape, seq_len: int) -> float:
    """2 * matmul params + causal attention 2 * L * a*d * s (QK^T and AV over s/2 keys on
    average) + the logits 2 * h * V."""
    return (2 * dense_matmul_params(m) + 2 * m.layers * m.q_dim * seq_len
            + 2 * m.hidden * m.vocab)


def step_flops(m: ModelShape, run: RunShape, recompute: bool) -> float:
    """Trainer FLOPs per step: tokens * forward * (1 old-policy pass + 3 training forward and
    backward + 1 recompute) + tokens * 2hV (the fused kernel recomputes the logits)."""
    passes = 4 + (1 if recompute else 0)
    return run.tokens * (passes * forward_flops_per_token(m, run.seq_len)
                         + 2 * m.hidden * m.vocab)


def dp_sync_seconds(m: ModelShape, lay: Layout, run: RunShape, hw: Hardware,
                    a: Assumptions) -> float:
    """Gradient reduction per step (not overlapped): per optimizer step, distributed
    optimizer: reduce-scatter fp32 grads + all-gather weights, (dp-1)/dp * (4 + e) bytes per
    param; else an fp32 all-reduce, 2 (dp-1)/dp * 4. Over NVLink inside a node, else the
    network."""
    if lay.dp == 1:
        return 0.0
    params = stage_params(m, lay.tp, lay.pp, "last" if lay.pp == 1 else "first")
    frac = (lay.dp - 1) / lay.dp
    per_param = (4 + DTYPE_BYTES[a.dtype]) if lay.distributed_optimizer else 8
    gbps = hw.nvlink_gbps if lay.gpus <= hw.gpus_per_node else hw.network_gbps
    return run.mini_batches * frac * per_param * params / (gbps * GB)


def trainer_seconds(m: ModelShape, run: RunShape, lay: Layout, hw: Hardware,
                    a: Assumptions) -> float:
    """step FLOPs / (GPUs * peak * MFU) / (1 - bubble) + the DP gradient sync."""
    bubble = pipeline_bubble(lay.pp, micro_batches_per_rank(run, lay.dp))
    compute = step_flops(m, run, lay.recompute) / (
        lay.gpus * hw.peak_tflops * 1e12 * trainer_mfu(lay.tp, hw, a))
    return compute / (1 - bubble) + dp_sync_seconds(m, lay, run, hw, a)


def sync_seconds(m: ModelShape, a: Assumptions) -> float:
    """Weight sync to SGLang: bf16 weights (2 * params) at the assumed sync throughput."""
    return 2 * hf_param_count(m) / (a.sync_gbps * GB)


def step_seconds(times: dict, overlapped: bool) -> float:
    """One step: rollout + reward + train + sync in sequence; with rollout.overlap
    (dedicated servers only) the next step's rollout and reward run while this one trains,
    max(rollout + reward, train) + sync."""
    if overlapped:
        return max(times["rollout_s"] + times["reward_s"], times["train_s"]) + times["sync_s"]
    return times["rollout_s"] + times["reward_s"] + times["train_s"] + times["sync_s"]
