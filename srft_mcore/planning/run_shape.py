"""What the planner's estimates take besides the model: the training step's shape, the
hardware, the assumed efficiencies and overheads, and the parallel layout; and the units.

Sizes are bytes unless a name says otherwise; ``GB`` in the output is 1e9 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GB = 1e9
GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class RunShape:
    """One training step, as in the config (train.*, rollout.*, data.*)."""

    prompts_per_step: int = 128
    n_samples: int = 8
    prompt_len: int = 1024
    response_len: int = 8192
    micro_batch: int = 1
    mini_batches: int = 2
    with_demos: bool = True
    """Each prompt's demonstration trains with its rollouts (SRFT, LUFFY, SFT)."""
    overlap: bool = False
    """rollout.overlap: dedicated servers generate the next step while this one trains."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def sequences(self) -> int:
        """Sequences trained per step: prompts * (n rollouts + 1 demonstration)."""
        return self.prompts_per_step * (self.n_samples + (1 if self.with_demos else 0))

    @property
    def tokens(self) -> int:
        """Tokens per step, every sequence padded to prompt + response (the worst case)."""
        return self.sequences * self.seq_len


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_mem_gb: float
    gpus_per_node: int = 8
    peak_tflops: float = 790.0
    """Dense bf16 matmul throughput (H100 8192^3 measured ~790 TFLOP/s)."""
    hbm_gbps: float = 3000.0
    """HBM bandwidth (H100 copy measured ~3.0 TB/s)."""
    nvlink_gbps: float = 300.0
    """Collective bus bandwidth per GPU inside a node (assumed)."""
    network_gbps: float = 40.0
    """Collective bus bandwidth per GPU across nodes (assumed: 400 Gb/s NICs, 80 %)."""


@dataclass(frozen=True)
class Assumptions:
    """Figures the estimates rest on; each is an assumption unless it says measured."""

    dtype: str = "bfloat16"
    """Training parameter dtype (model.dtype)."""
    spec: str = "te"
    """Layer spec: te (transformer-engine: flash attention, fused SwiGLU, sequence parallel)
    | local (Megatron's local spec: attention scores materialised, no sequence parallel)."""
    fused_adam: bool = True
    """TE/apex fused Adam (no per-tensor temporaries); False: torch's Adam."""
    overhead_gib: float = 4.0
    """Per GPU: CUDA context ~0.6 GiB, NCCL communicators and buffers ~1.5 GiB, allocator
    fragmentation ~2 GiB."""
    sglang_mem_fraction: Optional[float] = None
    """SGLang --mem-fraction-static: its weights + KV cache take at most this fraction of the
    GPU, counting memory that other processes (a colocated trainer) already hold. null = the
    trainer's default by placement (rollout.mem_fraction: 0.85 dedicated, 0.6 colocated)."""
    sglang_residual_gib: float = 1.0
    """An SGLang server's CUDA context: it comes out of its KV pool, and a colocated server
    still holds it while released for training."""
    max_requests_per_server: int = 64
    """rollout.max_concurrency: requests (one per prompt, n samples each) in flight."""
    mfu: float = 0.35
    """Trainer model-FLOPs utilisation at TP1 (assumed for bf16 Megatron with TE)."""
    mfu_tp_loss: float = 0.05
    """MFU / (1 + this * log2 TP): TP all-reduces inside a node."""
    mfu_cross_node_tp: float = 0.5
    """MFU factor when a TP group spans nodes."""
    decode_bw_eff: float = 0.7
    """Fraction of HBM bandwidth a decode step reaches reading weights and KV cache."""
    decode_flops_eff: float = 0.5
    """Fraction of peak FLOP/s of large-batch decode and of prefill."""
    decode_step_overhead_s: float = 1e-3
    """Scheduler + launch time per decode step, plus 2 all-reduces per layer of 10 us at
    server TP > 1."""
    sync_gbps: float = 5.0
    """Weight sync throughput (gather, name mapping, bucketed broadcast): 7B in ~3 s."""
    reward_s_per_sample: float = 0.003
    """math-verify per rollout on rank 0's CPU (measured 2-4 ms)."""
    lp_chunk_bytes: int = 128 * 2**20
    """The fused log-prob/entropy kernel's fp32 chunk of logits (DEFAULT_CHUNK_BYTES of
    ops/logprob_entropy.py; not imported, so the planner runs without torch)."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    recompute: bool = False
    """Full activation recomputation (model.recompute_granularity=full)."""
    distributed_optimizer: bool = True
    sequence_parallel: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp
