"""Step time: the trainer's compute (FLOPs at an assumed MFU, the pipeline bubble), its
gradient sync, the weight sync to SGLang (per sync mode), the colocated offload copies,
and how the phases of a step add up.
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


SYNC_MODES = ("distributed", "tensor", "disk")


def sync_seconds(m: ModelShape, mode: str, servers: int, server_tp: int, lay: Layout,
                 hw: Hardware, a: Assumptions) -> float:
    """Weight sync to ``servers`` SGLang servers of ``server_tp`` GPUs after a step; B = the
    bf16 weights (2 * params), buckets of sync_bucket_mb.

    Every mode ends with each server loading its copy, B / server_tp per GPU at
    sync_load_gbps, all servers in parallel (so one server's time, not the sum).

    distributed (dedicated servers): one broadcast group per pipeline stage spanning every
      server's TP ranks, so one broadcast per bucket reaches all servers; the stages send
      in parallel: B / pp / sync_gbps + load + an HTTP request per bucket and server
      (sync_http_s * buckets * servers).
    tensor (colocated): every trainer rank gets every bucket (B / sync_gbps; the part of
      the model held on other nodes, 1 - gpus_per_node / (tp * pp) when the model-parallel
      group spans nodes, also crosses the network at network_gbps), and each node's ranks
      hand handles to their own node's servers, nodes in parallel: + load + sync_http_s *
      buckets * servers per node.
    disk: the stages write B once and every server reads all of it from shared storage at
      once, sharing its bandwidth: B / storage_gbps * (1 + servers) + load + sync_http_s
      * servers."""
    if mode not in SYNC_MODES:
        raise ValueError(f"weight sync {mode!r}: use one of {', '.join(SYNC_MODES)}")
    b = 2 * hf_param_count(m)
    load = b / server_tp / (a.sync_load_gbps * GB)
    bucket = a.sync_bucket_mb * 2**20
    if mode == "distributed":
        buckets = math.ceil(b / lay.pp / bucket)
        return b / lay.pp / (a.sync_gbps * GB) + load + a.sync_http_s * buckets * servers
    if mode == "tensor":
        mp = lay.tp * lay.pp
        remote = 1 - hw.gpus_per_node / mp if mp > hw.gpus_per_node else 0.0
        nodes = max(1, math.ceil(lay.gpus / hw.gpus_per_node))
        per_node = math.ceil(servers / nodes)
        return (b / (a.sync_gbps * GB) + b * remote / (hw.network_gbps * GB) + load
                + a.sync_http_s * math.ceil(b / bucket) * per_node)
    return b * (1 + servers) / (hw.storage_gbps * GB) + load + a.sync_http_s * servers


def offload_seconds(bytes_one_way: int, hw: Hardware) -> float:
    """rollout.offload's copies per step: the trainer state to pinned host memory before
    generation and back before training, 2 * bytes / host_bw_gbs (each GPU on its own
    link, so the fullest GPU's bytes)."""
    return 2 * bytes_one_way / (hw.host_bw_gbs * GB)


def step_seconds(times: dict, overlapped: bool) -> float:
    """One step: rollout + reward + train + sync (+ offload: colocated state copies) in
    sequence; with rollout.overlap (dedicated servers only) the next step's rollout and
    reward run while this one trains, max(rollout + reward, train) + sync."""
    extra = times["sync_s"] + times.get("offload_s", 0.0)
    if overlapped:
        return max(times["rollout_s"] + times["reward_s"], times["train_s"]) + extra
    return times["rollout_s"] + times["reward_s"] + times["train_s"] + extra
