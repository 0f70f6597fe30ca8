"""srft-plan: which TP/PP/DP layouts and trainer/rollout GPU splits fit a model, and how fast.

    srft-plan --model qwen2.5-7b --gpus 8 --gpu-mem 80
    srft-plan --model path/to/config.json --gpus 64 --gpu-mem 80 --response-len 8192 --json

Everything here is arithmetic on the model's HF config and the run's shape; nothing is built
or launched. Each estimate is one named function whose docstring states its formula and
assumptions. Sizes are bytes unless a name says otherwise; ``GB`` in the output is 1e9 bytes.

Symbols: h hidden size, L layers, a attention heads, g key/value heads, d head dim, f MLP
intermediate size, V vocabulary (Megatron pads it to a multiple of 128 * TP), t tensor
parallel size, p pipeline stages, s sequence length (prompt + response), b micro-batch
sequences, e bytes per element of the training dtype (2 for bf16, 4 for fp32).

What one trainer GPU holds (a pipeline stage, 1/t of its split tensors):
  weights e/param + main grads 4/param (Megatron DDP, fp32 grad buffer)
  + Adam: fp32 master copy (bf16 only) + 2 fp32 moments, divided by DP with the
    distributed optimizer
  + activations of the micro-batches in flight (formula in :func:`layer_activation_bytes`)
  + the fused log-prob/entropy kernel's scratch on the last stage
  + the step's micro-batch tensors + a fixed overhead (CUDA context, NCCL, fragmentation).
SGLang: bf16 weights / server TP + a KV cache of 2 * L * g * d * 2 bytes per token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from srft_mcore.config import sglang_mem_fraction

GB = 1e9
GIB = 2**30

# --------------------------------------------------------------------------- presets
_QWEN25 = dict(model_type="qwen2", vocab_size=152064, tie_word_embeddings=False)
_QWEN25_SMALL = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
_QWEN3 = dict(model_type="qwen3", head_dim=128, vocab_size=151936)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, tie_word_embeddings=False,
               attention_bias=False)


def _preset(base: dict, h: int, layers: int, heads: int, kv: int, ffn: int, **extra) -> dict:
    return {**base, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, **extra}


PRESETS = {
    # name: the HF config.json values that decide sizes (published configs of each model)
    "qwen2.5-0.5b": _preset(_QWEN25_SMALL, 896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": _preset(_QWEN25_SMALL, 1536, 28, 12, 2, 8960),
    "qwen2.5-3b": _preset(_QWEN25_SMALL, 2048, 36, 16, 2, 11008),
    "qwen2.5-7b": _preset(_QWEN25, 3584, 28, 28, 4, 18944),
    "qwen2.5-14b": _preset(_QWEN25, 5120, 48, 40, 8, 13824),
    "qwen2.5-32b": _preset(_QWEN25, 5120, 64, 40, 8, 27648),
    "qwen2.5-72b": _preset(_QWEN25, 8192, 80, 64, 8, 29568),
    "qwen3-0.6b": _preset(_QWEN3, 1024, 28, 16, 8, 3072, tie_word_embeddings=True),
    "qwen3-1.7b": _preset(_QWEN3, 2048, 28, 16, 8, 6144, tie_word_embeddings=True),
    "qwen3-4b": _preset(_QWEN3, 2560, 36, 32, 8, 9728, tie_word_embeddings=True),
    "qwen3-8b": _preset(_QWEN3, 4096, 36, 32, 8, 12288, tie_word_embeddings=False),
    "qwen3-14b": _preset(_QWEN3, 5120, 40, 40, 8, 17408, tie_word_embeddings=False),
    "qwen3-32b": _preset(_QWEN3, 5120, 64, 64, 8, 25600, tie_word_embeddings=False),
    "llama3-8b": _preset(_LLAMA3, 4096, 32, 32, 8, 14336),
    "llama3-70b": _preset(_LLAMA3, 8192, 80, 64, 8, 28672),
}
ALIASES = {"llama-3-8b": "llama3-8b", "llama-3-70b": "llama3-70b",
           "llama3.1-8b": "llama3-8b", "llama3.1-70b": "llama3-70b"}


class PlanError(ValueError):
    """A bad planner input; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense decoder (Qwen2/Qwen2.5, Qwen3, Llama) that memory depends on."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    """q/k/v projections carry biases (Qwen2; Llama with attention_bias)."""
    qk_norm: bool
    """RMSNorm over each query and key head (Qwen3)."""
    o_bias: bool = False
    """The output projection carries a bias (Llama/Qwen3 with attention_bias)."""
    mlp_bias: bool = False
    """gate/up/down carry biases (Llama with mlp_bias)."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


SUPPORTED_TYPES = ("qwen2", "qwen3", "llama")


def shape_from_hf(hf: dict, name: str = "model") -> ModelShape:
    """A :class:`ModelShape` from a HF ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise PlanError(f"model_type {model_type!r} is not supported by the planner. Fix: use a "
                        f"config.json of one of {', '.join(SUPPORTED_TYPES)} (dense Qwen2/"
                        f"Qwen2.5, Qwen3, Llama) or a preset: {', '.join(PRESETS)}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in hf]
    if missing:
        raise PlanError(f"config.json of {name!r} lacks {', '.join(missing)}. Fix: pass the "
                        f"model's own config.json (from its Hugging Face directory)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or attention_bias
    return ModelShape(name=name, model_type=model_type, hidden=hidden,
                      layers=int(hf["num_hidden_layers"]), heads=heads,
                      kv_heads=int(hf.get("num_key_value_heads") or heads),
                      head_dim=int(hf.get("head_dim") or hidden // heads),
                      ffn=int(hf["intermediate_size"]), vocab=int(hf["vocab_size"]),
                      tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                      qk_norm=model_type == "qwen3",
                      o_bias=model_type != "qwen2" and attention_bias,
                      mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)))


def load_model(spec: str) -> ModelShape:
    """A preset name (case-insensitive) or a path to a config.json / HF model directory."""
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in PRESETS:
        return shape_from_hf(PRESETS[key], key)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise PlanError(f"--model {spec!r} is neither a preset nor a config.json. Fix: use one "
                        f"of {', '.join(PRESETS)}, or the path of a model's config.json")
    with open(path) as f:
        return shape_from_hf(json.load(f), os.path.basename(os.path.dirname(
            os.path.abspath(path))) or spec)


# --------------------------------------------------------------------------- parameters
def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def attention_params(m: ModelShape) -> int:
    """q, k, v, o projections: h*(a*d) + 2*h*(g*d) + (a*d)*h, + (a*d + 2*g*d) q/k/v biases
    (Qwen2; attention_bias), + h for an o_proj bias (attention_bias of Llama/Qwen3), + 2*d for
    the q/k RMSNorm weights (Qwen3)."""
    n = m.hidden * m.q_dim + 2 * m.hidden * m.kv_dim + m.q_dim * m.hidden
    if m.qkv_bias:
        n += m.q_dim + 2 * m.kv_dim
    if m.o_bias:
        n += m.hidden
    if m.qk_norm:
        n += 2 * m.head_dim
    return n


def mlp_params(m: ModelShape) -> int:
    """SwiGLU: gate and up h*f each, down f*h: 3*h*f, + 2f + h biases with mlp_bias."""
    return 3 * m.hidden * m.ffn + ((2 * m.ffn + m.hidden) if m.mlp_bias else 0)


def layer_params(m: ModelShape) -> int:
    """One decoder layer: attention + MLP + two RMSNorm weights (2*h)."""
    return attention_params(m) + mlp_params(m) + 2 * m.hidden


def hf_param_count(m: ModelShape) -> int:
    """Parameters of the HF model: L layers + embeddings V*h (again for an untied lm_head)
    + the final norm h. The exact count ``sum(p.numel())`` of the transformers model."""
    embeddings = m.vocab * m.hidden * (1 if m.tied else 2)
    return m.layers * layer_params(m) + embeddings + m.hidden


def layer_params_per_rank(m: ModelShape, tp: int) -> int:
    """One layer on one TP rank: the projections (and their column-parallel biases) split
    over t; the norms (2*h, and Qwen3's 2*d q/k norms) and row-parallel biases replicated."""
    replicated = (2 * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
                  + (m.hidden if m.o_bias else 0) + (m.hidden if m.mlp_bias else 0))
    return (layer_params(m) - replicated) // tp + replicated


def stage_layers(m: ModelShape, pp: int) -> int:
    """Layers of the largest pipeline stage: ceil(L / p) (an uneven split when p does not
    divide L; Megatron's pp_layer_split)."""
    return -(-m.layers // pp)


def stage_params(m: ModelShape, tp: int, pp: int, stage: str) -> int:
    """Parameters one GPU of a stage holds (Megatron layout, padded vocabulary).

    first: its layers + the word embeddings V_pad*h/t; last: its layers + the output layer
    V_pad*h/t (tied models keep a copy of the embeddings there when p > 1) + the final norm;
    with p = 1 one stage holds all of it (tied: the embeddings once)."""
    emb = padded_vocab(m.vocab, tp) * m.hidden // tp
    n = stage_layers(m, pp) * layer_params_per_rank(m, tp)
    if pp == 1:
        return n + emb * (1 if m.tied else 2) + m.hidden
    if stage == "first":
        return n + emb
    return n + emb + m.hidden  # last: output layer (or the tied copy) + final norm


def dense_matmul_params(m: ModelShape) -> int:
    """Weights that multiply every token: the layers' projections, not norms or biases."""
    return m.layers * (m.hidden * m.q_dim + 2 * m.hidden * m.kv_dim + m.q_dim * m.hidden
                       + 3 * m.hidden * m.ffn)


# --------------------------------------------------------------------------- run shape
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


# --------------------------------------------------------------------------- trainer memory
def weight_bytes(params: int, a: Assumptions) -> int:
    """Model weights: params * e (e = 2 for bf16)."""
    return params * DTYPE_BYTES[a.dtype]


def grad_bytes(params: int) -> int:
    """Megatron DDP's gradient buffer: params * 4 (fp32 main grads, grad_reduce_in_fp32)."""
    return params * 4


def optimizer_bytes(params: int, dp: int, distributed: bool, a: Assumptions) -> int:
    """Adam: two fp32 moments (8 bytes/param) + an fp32 master copy when the weights are
    bf16/fp16 (4 bytes/param); the distributed optimizer shards all of it over DP:
    params * (8 [+ 4]) / DP."""
    per_param = 8 + (4 if DTYPE_BYTES[a.dtype] < 4 else 0)
    shards = dp if distributed and dp > 1 else 1
    return math.ceil(params * per_param / shards)


def norm_bytes(m: ModelShape, tp: int, sp: bool, a: Assumptions) -> float:
    """Bytes one RMSNorm keeps per token.

    local: torch's RMSNorm saves its input upcast to fp32 and the fp32 normalised input,
    and the next linear saves the output: h * (4 + 4 + e) (fp32: the upcast is the input
    itself, so 3 * 4 * h). te: the fused norm+linear keeps input and norm output: 2 * h * e.
    Sequence parallel divides by t."""
    e = DTYPE_BYTES[a.dtype]
    per = m.hidden * (8 + e) if a.spec == "local" else 2 * m.hidden * e
    return per / (tp if sp else 1)


def attention_bytes(m: ModelShape, tp: int, seq_len: int, a: Assumptions) -> float:
    """Bytes attention keeps per token, over t (heads split over TP).

    local: query after RoPE, key and value repeated to all a heads for GQA (3*a*d; without
    GQA the value is a view that keeps the fused qkv output: (2a + 3g)*d), the softmax
    probabilities a*s (the s^2 term), the projection input a*d, and RoPE's cos/sin tables
    for q and k, 4*d (unfused RoPE saves them per call).
    te (flash attention, fused RoPE): the fused qkv output (a + 2g)*d (the value is a view of
    it), the rotated q, k (a + g)*d and the attention output a*d; no s^2 term.
    Qwen3's q/k norms (local): the norm input pins the qkv output, (a + 2g)*d, plus the fp32
    normalised q and k, (a + g)*d*4 (derived, not measured); te: nothing more."""
    e = DTYPE_BYTES[a.dtype]
    q, kv = m.q_dim, m.kv_dim
    if a.spec != "local":
        return ((q + 2 * kv) + (q + kv) + q) * e / tp
    qkv = 3 * q if m.heads > m.kv_heads else 2 * q + 3 * kv
    split = (qkv + q + m.heads * seq_len) * e
    if m.qk_norm:
        split += (q + 2 * kv) * e + (q + kv) * 4
    return split / tp + 4 * m.head_dim * e  # the RoPE tables are not split


def mlp_bytes(m: ModelShape, tp: int, a: Assumptions) -> float:
    """Bytes the SwiGLU MLP keeps per token, over t.

    local: fc1 output (gate|up) 2f, silu(gate) f, up + glu_linear_offset f (megatron-core
    0.16 adds the offset, a new tensor), their product f (the fc2 input): 5f*e.
    te (fused bias-SwiGLU): fc1 output 2f and the product f: 3f*e."""
    e = DTYPE_BYTES[a.dtype]
    return (5 if a.spec == "local" else 3) * m.ffn * e / tp


def layer_activation_bytes(m: ModelShape, tp: int, sp: bool, seq_len: int,
                           a: Assumptions) -> float:
    """Activation bytes one decoder layer keeps per token for its backward (no recompute):

        2 * norm + attention + mlp        (see the three functions)

    local spec, fp32:  4 * [2*3h + (4a*d [GQA] + a*s + 5f)/t + 4d]
    te spec, bf16:     2 * [2*2h/(t if SP) + (3a*d + 3g*d + 3f)/t]
    The same derivation as Korthikanti et al. 2022 (Megatron's 34 + 5as/h per token for
    GPT-3), for SwiGLU, GQA, RMSNorm and no dropout."""
    return 2 * norm_bytes(m, tp, sp, a) + attention_bytes(m, tp, seq_len, a) + mlp_bytes(m, tp, a)


def backward_transient_bytes(m: ModelShape, tp: int, seq_len: int, a: Assumptions) -> float:
    """Per token, the largest temporaries of one layer's backward beyond what it saved.

    local: the softmax backward holds the probabilities' gradient and the scores'
    gradient, 2 * a*s*e / t (the s^2 term again). te: the fc1 output's gradient 2f*e / t
    (the largest gradient of the layer)."""
    e = DTYPE_BYTES[a.dtype]
    if a.spec == "local":
        return 2 * m.heads * seq_len * e / tp
    return 2 * m.ffn * e / tp


def attention_buffer_bytes(m: ModelShape, tp: int, b: int, seq_len: int, a: Assumptions) -> int:
    """local spec only: Megatron's global buffer for the attention scores, b*a/t*s^2*e,
    allocated at the first step and kept, plus a causal mask s^2 bool."""
    if a.spec != "local":
        return 0
    return b * (m.heads // tp) * seq_len ** 2 * DTYPE_BYTES[a.dtype] + seq_len ** 2


def causal_mask_bytes(seq_len: int, a: Assumptions) -> int:
    """local spec only: each layer's softmax keeps the micro-batch's causal mask, s^2 bool."""
    return seq_len ** 2 if a.spec == "local" else 0


def final_norm_and_loss_bytes(m: ModelShape, tp: int, sp: bool, a: Assumptions) -> float:
    """Per token on the last stage: the final norm (as :func:`norm_bytes`; the fused
    kernel keeps its output as input) + the kernel's fp32 statistics and outputs
    (max, log-sum-exp, entropy, log-prob, 2 outputs: 24 bytes) + the loss's per-token fp32
    values (~16 tensors: 64 bytes, an upper bound)."""
    return norm_bytes(m, tp, sp, a) + 24 + 64


def logprob_scratch_bytes(m: ModelShape, tp: int, tokens: int, a: Assumptions) -> int:
    """The linear-fused log-prob/entropy kernel's backward on the last stage.

    Chunk: c = min(tokens, chunk_bytes / (4 * V_pad/t)) tokens of fp32 logits [c, V_pad/t];
    its working set is 2 chunks (logits and softmax; bf16: + the bf16 matmul output and
    gradient, 2.5). Plus the fp32 gradient of the hidden states 4*h per token (+ e*h for
    its cast), and of the output weight 4*V_pad/t*h (bf16: + a bf16 product and its fp32
    copy per chunk, 6*V_pad/t*h)."""
    e = DTYPE_BYTES[a.dtype]
    v_local = padded_vocab(m.vocab, tp) // tp
    chunk_tokens = min(tokens, max(1, a.lp_chunk_bytes // (4 * v_local)))
    chunks = (2.0 if e == 4 else 2.5) * chunk_tokens * v_local * 4
    grad_h = tokens * m.hidden * (4 + (e if e != 4 else 0))
    grad_w = v_local * m.hidden * (4 if e == 4 else 10)
    return int(chunks + grad_h + grad_w)


def batch_tensor_bytes(run: RunShape, dp: int) -> int:
    """The step's micro-batches of this DP rank, on the device for the whole step: tokens,
    targets, positions, sequence ids (int64) + loss mask, SGLang log-probs and their mask,
    old log-probs (fp32): 48 bytes per token, sequences / DP * (prompt + response)."""
    return 48 * math.ceil(run.sequences / dp) * run.seq_len


def micro_batches_per_rank(run: RunShape, dp: int) -> int:
    """Micro-batches one DP rank runs per optimizer mini-batch:
    ceil(sequences / mini_batches / (DP * micro_batch))."""
    return max(1, math.ceil(run.sequences / run.mini_batches / (dp * run.micro_batch)))


def in_flight_micro_batches(pp: int, m_batches: int, stage: str) -> int:
    """1F1B keeps min(p - i, m) micro-batches' activations on stage i: p on the first
    stage, 1 on the last."""
    return 1 if stage == "last" or pp == 1 else min(pp, m_batches)


def stage_activation_bytes(m: ModelShape, run: RunShape, lay: Layout, stage: str,
                           a: Assumptions) -> dict:
    """Activation-phase bytes of one GPU of ``stage`` at its backward peak.

    Saved: no recompute, in_flight * layers * b*s * layer_activation; full recompute,
    in_flight * layers * b*s * h*e (/t with SP: each layer's input) + one layer's
    activations recomputed. The last stage adds the final norm / loss per token. On top of
    the saved activations comes the larger of two moments: the fused kernel's backward
    scratch (last stage, first thing in the backward) and one layer's backward transient.
    The local spec adds its persistent score buffer."""
    e = DTYPE_BYTES[a.dtype]
    sp = lay.sequence_parallel
    tokens_mb = run.micro_batch * run.seq_len
    layers = stage_layers(m, lay.pp)
    flight = in_flight_micro_batches(lay.pp, micro_batches_per_rank(run, lay.dp), stage)
    per_layer = (layer_activation_bytes(m, lay.tp, sp, run.seq_len, a) * tokens_mb
                 + causal_mask_bytes(run.seq_len, a))
    transient = backward_transient_bytes(m, lay.tp, run.seq_len, a) * tokens_mb
    if lay.recompute:
        saved = flight * layers * tokens_mb * m.hidden * e / (lay.tp if sp else 1) + per_layer
    else:
        saved = flight * layers * per_layer
    saved += attention_buffer_bytes(m, lay.tp, run.micro_batch, run.seq_len, a)
    scratch = 0
    if stage == "last" or lay.pp == 1:
        saved += final_norm_and_loss_bytes(m, lay.tp, sp, a) * tokens_mb
        scratch = logprob_scratch_bytes(m, lay.tp, tokens_mb, a)
    return {"activations": int(saved), "logprob_scratch": scratch,
            "backward_transient": int(transient)}


def optimizer_step_transient_bytes(params: int, largest: int, dp: int, distributed: bool,
                                   a: Assumptions) -> int:
    """Temporaries of the optimizer phase (activations are freed by then): the finite-grad
    check's two bool masks over the grad buffer (2 bytes/param) and, with torch's Adam, the
    per-tensor temporaries of the largest tensor shard (2 * 4 bytes/element)."""
    shards = dp if distributed and dp > 1 else 1
    adam = 0 if a.fused_adam else 8 * math.ceil(largest / shards)
    return 2 * params + adam


@dataclass
class StageMemory:
    stage: str
    terms: dict
    """Named byte counts; resident terms stay, activations/scratch are the training peak."""
    peak: int
    resident: int
    """What stays on the GPU outside training (weights, grads, optimizer, batch, overhead)."""


def stage_memory(m: ModelShape, run: RunShape, lay: Layout, stage: str,
                 a: Assumptions, colocated: bool = False) -> StageMemory:
    """Peak bytes of one trainer GPU of ``stage``: resident + max(activation phase,
    optimizer phase); colocated adds the released SGLang server's residual."""
    params = stage_params(m, lay.tp, lay.pp, stage)
    terms = {
        "weights": weight_bytes(params, a),
        "grads": grad_bytes(params),
        "optimizer": optimizer_bytes(params, lay.dp, lay.distributed_optimizer, a),
        "batch": batch_tensor_bytes(run, lay.dp),
        "overhead": int(a.overhead_gib * GIB),
    }
    if colocated:
        terms["sglang_released"] = int(a.sglang_residual_gib * GIB)
    resident = sum(terms.values())
    terms.update(stage_activation_bytes(m, run, lay, stage, a))
    largest = padded_vocab(m.vocab, lay.tp) * m.hidden // lay.tp
    terms["optimizer_step_transient"] = optimizer_step_transient_bytes(
        params, largest, lay.dp, lay.distributed_optimizer, a)
    training = terms["activations"] + max(terms["logprob_scratch"],
                                          terms["backward_transient"])
    peak = resident + max(training, terms["optimizer_step_transient"])
    return StageMemory(stage=stage, terms=terms, peak=peak, resident=resident)


def trainer_memory(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool = False) -> StageMemory:
    """The fullest GPU of the layout: the larger of the first and last stage."""
    stages = ["last"] if lay.pp == 1 else ["first", "last"]
    return max((stage_memory(m, run, lay, s, a, colocated) for s in stages),
               key=lambda s: s.peak)


# --------------------------------------------------------------------------- rollout
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


# --------------------------------------------------------------------------- trainer time
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


# --------------------------------------------------------------------------- search
@dataclass
class Plan:
    layout: Layout
    rollout: RolloutPlan
    trainer_gpus: int
    memory: StageMemory
    fits: bool
    why: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    pp_split: Optional[list] = None
    options: dict = field(default_factory=dict)
    """Peak GB with the optimizer/recompute options toggled (:func:`memory_options`)."""

    def label(self) -> str:
        r = self.rollout
        where = "colocated" if r.mode == "colocated" else f"{r.gpus} GPUs"
        return (f"TP{self.layout.tp} PP{self.layout.pp} DP{self.layout.dp} | rollout "
                f"{where} ({r.servers} x TP{r.server_tp})")


def _divisors(n: int) -> list:
    return [k for k in range(1, n + 1) if n % k == 0]


def tp_candidates(m: ModelShape) -> list:
    """TP sizes the bridge accepts: dividing both the attention heads and the key/value
    heads (so TP is at most g)."""
    return [t for t in _divisors(m.kv_heads) if m.heads % t == 0]


def pp_candidates(m: ModelShape) -> list:
    """Pipeline sizes 1..16 with at least 2 layers per stage; when p does not divide L the
    stages differ by one layer (train with ``parallel.pp_layer_split``, see
    :func:`pp_layer_split`)."""
    return [p for p in range(1, 17) if m.layers // p >= 2]


def pp_layer_split(m: ModelShape, pp: int) -> Optional[list]:
    """Layers per stage for an uneven split (the first stages one layer more), else None."""
    if m.layers % pp == 0:
        return None
    base, extra = divmod(m.layers, pp)
    return [base + 1] * extra + [base] * (pp - extra)


def server_tp_candidates(m: ModelShape, gpus: int, hw: Hardware) -> list:
    """SGLang TP sizes: dividing the attention heads and the GPUs given, within a node."""
    return [t for t in (1, 2, 4, 8) if m.heads % t == 0 and gpus % t == 0
            and t <= hw.gpus_per_node]


def fit_reasons(mem: StageMemory, hw: Hardware) -> list:
    """Why a trainer GPU overflows: the total against the card and its largest terms."""
    cap = hw.gpu_mem_gb * GB
    if mem.peak <= cap:
        return []
    terms = {k: v for k, v in mem.terms.items() if not k.endswith("transient")}
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in top)
    return [f"trainer ({mem.stage} stage): {mem.peak / GB:.1f} GB > {hw.gpu_mem_gb:g} GB "
            f"(largest: {parts} GB)"]


def memory_options(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool) -> dict:
    """Peak GB of the layout's fullest GPU with and without the distributed optimizer and
    full recomputation."""
    out = {}
    for dist_opt in (True, False):
        for rc in (False, True):
            key = ("distopt" if dist_opt else "no_distopt") + ("_recompute" if rc else "")
            mem = trainer_memory(m, run, replace(lay, distributed_optimizer=dist_opt,
                                                 recompute=rc), a, colocated)
            out[key] = round(mem.peak / GB, 1)
    return out


def best_rollout(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, gpus: int,
                 trainer_resident: int, colocated: bool) -> RolloutPlan:
    """The fastest server TP that fits; when none does, the one with the most KV room."""
    options = [rollout_plan(m, run, hw, a, gpus, stp, trainer_resident, colocated)
               for stp in server_tp_candidates(m, gpus, hw)]
    fitting = [o for o in options if o.fits]
    if fitting:
        return min(fitting, key=lambda o: (o.seconds, o.server_tp))
    if options:
        return max(options, key=lambda o: (o.kv_gb_per_gpu, o.server_tp))
    return RolloutPlan("colocated" if colocated else "dedicated", gpus, 0, 0, False, 0.0, 0,
                       math.inf, f"sglang: no server TP divides {gpus} GPUs and {m.heads} heads")


def evaluate(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, tp: int, pp: int,
             dp: int, rollout_gpus: int, colocated: bool) -> Plan:
    """One layout + rollout split: memory (no recompute if it fits, else full recompute),
    the best server TP, step time and tokens/s."""
    sp = a.spec == "te" and tp > 1
    lay = Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=sp)
    mem = trainer_memory(m, run, lay, a, colocated)
    if mem.peak > hw.gpu_mem_gb * GB:
        lay = replace(lay, recompute=True)
        mem = trainer_memory(m, run, lay, a, colocated)
    why = fit_reasons(mem, hw)
    mini = run.prompts_per_step // run.mini_batches
    if mini % dp:
        why.append(f"config: {mini} prompts per mini-batch are not divisible by DP {dp}")
    resident = mem.resident - mem.terms.get("sglang_released", 0) if colocated else 0
    rollout = best_rollout(m, run, hw, a, hw.gpus if colocated else rollout_gpus, resident,
                           colocated)
    if not rollout.fits:
        why.append(rollout.why)
    times = {"rollout_s": rollout.seconds,
             "reward_s": run.prompts_per_step * run.n_samples * a.reward_s_per_sample,
             "train_s": trainer_seconds(m, run, lay, hw, a), "sync_s": sync_seconds(m, a)}
    total = step_seconds(times, overlapped=run.overlap and not colocated)
    times["step_s"] = total
    return Plan(layout=lay, rollout=rollout, trainer_gpus=lay.gpus, memory=mem,
                fits=not why, why=why, times=times, pp_split=pp_layer_split(m, pp),
                options=memory_options(m, run, lay, a, colocated),
                tokens_per_s=run.tokens / total if math.isfinite(total) else 0.0)


def rollout_splits(hw: Hardware, fixed: Optional[int]) -> list:
    """Dedicated rollout GPU counts to try: the one given, else every count leaving the
    trainer at least one GPU (whole nodes beyond 8 GPUs)."""
    if fixed is not None:
        return [fixed]
    step = hw.gpus_per_node if hw.gpus > hw.gpus_per_node else 1
    return list(range(step, hw.gpus, step))


def search(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
           rollout_gpus: Optional[int] = None, colocated: Optional[bool] = None) -> list:
    """Every TP x PP x DP layout and rollout placement (colocated on all GPUs, or dedicated
    rollout GPUs beside the trainer), evaluated; fitting plans first, fastest first."""
    placements = []
    if colocated is not False and rollout_gpus is None:
        placements.append((hw.gpus, 0, True))
    if not colocated:
        placements += [(hw.gpus - k, k, False) for k in rollout_splits(hw, rollout_gpus)]
    plans = []
    for train_gpus, k, coloc in placements:
        for tp in tp_candidates(m):
            for pp in pp_candidates(m):
                if train_gpus % (tp * pp):
                    continue
                plans.append(evaluate(m, run, hw, a, tp, pp, train_gpus // (tp * pp), k, coloc))
    plans.sort(key=lambda p: (not p.fits, -p.tokens_per_s, p.memory.peak))
    return plans


def _config_ok(p: Plan) -> bool:
    return not any(w.startswith("config:") for w in p.why)


def _explain(plans: list) -> Optional[dict]:
    """The best fitting plan of ``plans``, else the config-valid one with the least trainer
    memory, with its reasons."""
    good = [p for p in plans if p.fits]
    if good:
        return {"fits": True, "plan": good[0].label(), "tokens_per_s": round(good[0].tokens_per_s)}
    valid = [p for p in plans if _config_ok(p)]
    if not valid:
        return None
    p = min(valid, key=lambda p: (p.memory.peak, -p.rollout.kv_gb_per_gpu))
    return {"fits": False, "plan": p.label(), "why": p.why}


def _explain_placements(plans: list) -> dict:
    """The best fitting plan, or per rollout placement why none fits."""
    best = _explain(plans)
    if best is None or best["fits"]:
        return {"fits": bool(best), "best": best}
    return {"fits": False, "why_not": {mode: _explain([p for p in plans if p.rollout.mode == mode])
                                       for mode in ("colocated", "dedicated")}}


def tp_summary(plans: list, m: ModelShape) -> dict:
    """Per TP size: its best plan, or for each rollout placement why none fits (the reasons
    of the layout needing the least memory); the same for its plain TP x DP layouts (PP1)."""
    out = {}
    for tp in tp_candidates(m):
        mine = [p for p in plans if p.layout.tp == tp]
        out[f"TP{tp}"] = {**_explain_placements(mine),
                          "pp1": _explain_placements([p for p in mine if p.layout.pp == 1])}
    return out


# --------------------------------------------------------------------------- output
def plan_to_dict(p: Plan) -> dict:
    r = p.rollout
    return {
        "tp": p.layout.tp, "pp": p.layout.pp, "dp": p.layout.dp, "trainer_gpus": p.trainer_gpus,
        "pp_layer_split": p.pp_split,
        "recompute": "full" if p.layout.recompute else None,
        "sequence_parallel": p.layout.sequence_parallel,
        "distributed_optimizer": p.layout.distributed_optimizer,
        "rollout": {"mode": r.mode, "gpus": r.gpus, "servers": r.servers,
                    "server_tp": r.server_tp, "kv_gb_per_gpu": r.kv_gb_per_gpu,
                    "concurrent_seqs_per_server": r.concurrent_seqs},
        "fits": p.fits, "why_not": p.why,
        "memory_gb": {"peak": round(p.memory.peak / GB, 2), "stage": p.memory.stage,
                      **{k: round(v / GB, 2) for k, v in p.memory.terms.items()},
                      "options": p.options},
        "time_s": {k: round(v, 1) if math.isfinite(v) else None for k, v in p.times.items()},
        "tokens_per_s": round(p.tokens_per_s),
    }


def build_report(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
                 rollout_gpus: Optional[int] = None, colocated: Optional[bool] = None,
                 top: int = 10) -> dict:
    plans = search(m, run, hw, a, rollout_gpus, colocated)
    fitting = [p for p in plans if p.fits]
    report = {
        "model": {"name": m.name, **asdict(m), "params": hf_param_count(m),
                  "kv_bytes_per_token": kv_bytes_per_token(m)},
        "run": {**asdict(run), "sequences_per_step": run.sequences,
                "tokens_per_step": run.tokens},
        "hardware": asdict(hw), "assumptions": asdict(a),
        "layouts": [plan_to_dict(p) for p in fitting[:top]],
        "fitting_count": len(fitting),
        "not_fitting": [plan_to_dict(p) for p in plans if not p.fits][:top],
        "tp_summary": tp_summary(plans, m),
    }
    return report


def format_table(report: dict) -> str:
    """The ranked fitting plans as a Markdown table, then why each TP does or does not fit."""
    m, hw = report["model"], report["hardware"]
    lines = [f"{m['name']}: {m['params'] / 1e9:.2f}B params on {hw['gpus']} x "
             f"{hw['gpu_mem_gb']:g} GB; step = {report['run']['sequences_per_step']} sequences "
             f"x {report['run']['prompt_len'] + report['run']['response_len']} tokens", "",
             "| # | TP | PP | DP | recompute | trainer peak GB | rollout | KV GB/GPU | seqs/server "
             "| rollout s | train s | step s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(report["layouts"], 1):
        r, t = p["rollout"], p["time_s"]
        where = "colocated" if r["mode"] == "colocated" else f"{r['gpus']} GPUs"
        lines.append(f"| {i} | {p['tp']} | {p['pp']} | {p['dp']} | {p['recompute'] or '-'} | "
                     f"{p['memory_gb']['peak']:.1f} | {where}, {r['servers']} x TP"
                     f"{r['server_tp']} | {r['kv_gb_per_gpu']:.1f} | "
                     f"{r['concurrent_seqs_per_server']} | {t['rollout_s']:.0f} | "
                     f"{t['train_s']:.0f} | {t['step_s']:.0f} | {p['tokens_per_s']:,} |")
    if not report["layouts"]:
        lines.append("| - | no layout fits | | | | | | | | | | | |")
    lines.append("")
    for tp, info in report["tp_summary"].items():
        lines += _summary_lines(tp, info)
        if not info["fits"] or info["best"]["plan"].split(" |")[0].split()[1] != "PP1":
            lines += _summary_lines(f"{tp} PP1", info["pp1"])
    return "\n".join(lines)


def _summary_lines(name: str, info: dict) -> list:
    if info["fits"]:
        b = info["best"]
        return [f"{name}: fits, best {b['plan']} ({b['tokens_per_s']:,} tokens/s)"]
    out = []
    for mode, sub in info.get("why_not", {}).items():
        if sub is None:
            out.append(f"{name} {mode}: no layout (GPU count, or batch not divisible by DP)")
        else:
            out.append(f"{name} {mode}: does not fit, e.g. {sub['plan']}: " + "; ".join(sub["why"]))
    return out or [f"{name}: no layout (GPU count, or batch not divisible by DP)"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="srft-plan", description="Which TP/PP/DP layouts and rollout GPU splits fit a "
        "model for SRFT, ranked by estimated throughput (arithmetic only, nothing runs).")
    ap.add_argument("--model", required=True,
                    help=f"a preset ({', '.join(PRESETS)}) or a config.json / HF model dir")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all (trainer + rollout)")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--response-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--no-demos", action="store_true",
                    help="rollouts only (GRPO): no demonstration per prompt")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--rollout-gpus", type=int, help="dedicated SGLang GPUs (fixed)")
    where.add_argument("--colocated", action="store_true",
                       help="SGLang shares the trainer's GPUs (released during training)")
    ap.add_argument("--overlap", action="store_true",
                    help="rollout.overlap: dedicated rollouts of the next step run during "
                    "training (colocated plans stay sequential)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--spec", default="te", choices=("te", "local"))
    ap.add_argument("--sglang-mem-fraction", type=float, default=None,
                    help="SGLang --mem-fraction-static (default: the trainer's by placement, "
                         "0.85 dedicated, 0.6 colocated)")
    ap.add_argument("--overhead-gib", type=float, default=4.0)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--hbm-gbps", type=float, default=3000.0)
    ap.add_argument("--top", type=int, default=10, help="fitting plans to list")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def check_args(args) -> None:
    """Input checks with the fix in the message."""
    positive = {"--gpus": args.gpus, "--gpu-mem": args.gpu_mem, "--prompts-per-step":
                args.prompts_per_step, "--n-samples": args.n_samples, "--prompt-len":
                args.prompt_len, "--response-len": args.response_len, "--micro-batch":
                args.micro_batch, "--mini-batches": args.mini_batches,
                "--gpus-per-node": args.gpus_per_node}
    for flag, value in positive.items():
        if value <= 0:
            raise PlanError(f"{flag}={value} must be positive. Fix: pass a value > 0")
    if args.prompts_per_step % args.mini_batches:
        raise PlanError(f"--mini-batches={args.mini_batches} does not divide "
                        f"--prompts-per-step={args.prompts_per_step}. Fix: choose a divisor")
    if args.rollout_gpus is not None and not 0 < args.rollout_gpus < args.gpus:
        raise PlanError(f"--rollout-gpus={args.rollout_gpus} must leave the trainer GPUs out of "
                        f"--gpus={args.gpus}. Fix: 1 <= --rollout-gpus < --gpus, or --colocated")
    if args.sglang_mem_fraction is not None and not 0 < args.sglang_mem_fraction < 1:
        raise PlanError(f"--sglang-mem-fraction={args.sglang_mem_fraction} must be in (0, 1). "
                        f"Fix: e.g. 0.6")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        model = load_model(args.model)
    except PlanError as e:
        print(f"srft-plan: {e}", file=sys.stderr)
        return 2
    run = RunShape(prompts_per_step=args.prompts_per_step, n_samples=args.n_samples,
                   prompt_len=args.prompt_len, response_len=args.response_len,
                   micro_batch=args.micro_batch, mini_batches=args.mini_batches,
                   with_demos=not args.no_demos, overlap=args.overlap)
    hw = Hardware(gpus=args.gpus, gpu_mem_gb=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                  peak_tflops=args.peak_tflops, hbm_gbps=args.hbm_gbps)
    a = Assumptions(dtype=args.dtype, spec=args.spec, overhead_gib=args.overhead_gib,
                    sglang_mem_fraction=args.sglang_mem_fraction)
    report = build_report(model, run, hw, a, args.rollout_gpus,
                          True if args.colocated else None, top=args.top)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
