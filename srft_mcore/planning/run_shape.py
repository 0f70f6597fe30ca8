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
    max_tokens_per_micro_batch: Optional[int] = None
    """train.max_tokens_per_micro_batch: pack sequences into rows of at most this many
    tokens (one row per micro-batch, micro_batch ignored); None = micro_batch padded rows."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def sequences(self) -> int:
        """Sequences trained per step: prompts * (n rollouts + 1 demonstration)."""
        return self.prompts_per_step * (self.n_samples + (1 if self.with_demos else 0))

    @property
    def packed(self) -> bool:
        return self.max_tokens_per_micro_batch is not None

    @property
    def row_len(self) -> int:
        """Tokens of one micro-batch row: the packing budget, else one padded sequence."""
        return self.max_tokens_per_micro_batch if self.packed else self.seq_len

    @property
    def rows_per_micro_batch(self) -> int:
        return 1 if self.packed else self.micro_batch

    @property
    def tokens_per_micro_batch(self) -> int:
        """What activations and logits scale with: the packed budget (a row may be filled to
        it with shorter sequences), else micro_batch * (prompt + response)."""
        return self.rows_per_micro_batch * self.row_len

    @property
    def seqs_per_micro_batch(self) -> int:
        """Sequences per micro-batch when every one runs to full length (the worst case for
        the micro-batch count): budget // (prompt + response) when packed."""
        return max(1, self.row_len // self.seq_len) if self.packed else self.micro_batch

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
    host_bw_gbs: float = 25.0
    """Host <-> device copy bandwidth per GPU, each direction (PCIe 4/5 x16 with pinned
    memory, assumed): what offloading the trainer's state during rollout costs."""
    max_mem_frac: float = 0.9
    """Headroom: a plan fits when every GPU's peak (trainer, and SGLang colocated or not)
    stays at or below this fraction of gpu_mem_gb."""
    storage_gbps: float = 2.0
    """Shared storage read bandwidth in all (weight_sync=disk: servers reading at once share
    it; assumed)."""

    @property
    def cap_bytes(self) -> float:
        """The memory a plan may use per GPU: max_mem_frac * gpu_mem_gb."""
        return self.max_mem_frac * self.gpu_mem_gb * GB


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
    """SGLang --mem-fraction-static (rollout.mem_fraction): its weights + KV cache take at
    most this fraction of the GPU, counting memory that other processes (a colocated
    trainer) already hold. None = chosen per plan (rollout_estimate.choose_mem_fraction)."""
    sglang_runtime_gib: float = 4.0
    """SGLang memory outside its static pool: CUDA graphs, decode activations, sampling
    buffers (assumed). The pool fraction is at most max_mem_frac - this / GPU memory."""
    offload: str = "state"
    """rollout.offload of colocated plans: none (the trainer's state stays on the GPU during
    rollout) | state (gradient buffers + optimizer state go to pinned host memory) | all
    (state + weights)."""
    weight_sync: str = "distributed"
    """Dedicated plans' rollout.weight_sync: distributed | disk (colocated: tensor)."""
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
    """Weight export throughput of one pipeline stage (TP all-gather, name mapping, bucketed
    broadcast or IPC hand-over): 7B in ~3 s (assumed)."""
    sync_load_gbps: float = 20.0
    """A server GPU loading received weights into its model (assumed); servers load in
    parallel."""
    sync_http_s: float = 2e-3
    """Per server and bucket: the HTTP request that tells it to receive/load (assumed)."""
    sync_bucket_mb: int = 512
    """rollout.bucket_mb of the recipes."""
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
