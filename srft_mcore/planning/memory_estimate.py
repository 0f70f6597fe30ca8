"""Trainer memory per GPU: the resident state and the peak of a training step, per
pipeline stage, as the sum of named terms (each one function stating its formula).

Symbols as in :mod:`srft_mcore.planning.model_shape`, and s sequence length (prompt +
response), b micro-batch sequences, e bytes per element of the training dtype (2 for bf16,
4 for fp32).

What one trainer GPU holds (a pipeline stage, 1/t of its split tensors):
  weights e/param + main grads 4/param (Megatron DDP, fp32 grad buffer)
  + Adam: fp32 master copy (bf16 only) + 2 fp32 moments, divided by DP with the
    distributed optimizer
  + activations of the micro-batches in flight (formula in :func:`layer_activation_bytes`)
  + the fused log-prob/entropy kernel's scratch on the last stage
  + the step's micro-batch tensors + a fixed overhead (CUDA context, NCCL, fragmentation).

Every pipeline stage is computed (1F1B: stage i keeps p - i micro-batches; the first holds
the embeddings, the last the output layer and the loss), and an uneven split gives its
extra layers to the stages with the least memory (:func:`balanced_layer_split`). With
packing (train.max_tokens_per_micro_batch) a micro-batch's tokens are the budget, not
micro_batch * (prompt + response). What a colocated GPU keeps during generation depends on
rollout.offload (:data:`OFFLOAD_KEEPS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from srft_mcore.planning.model_shape import ModelShape, padded_vocab, stage_layers, stage_params
from srft_mcore.planning.run_shape import DTYPE_BYTES, GIB, Assumptions, Layout, RunShape


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

    Chunk: c = min(tokens, chunk_bytes / (4 * V_pad/t)) tokens of fp32 logits [c, V_pad/t].
    The logits buffer holds max(c, k) tokens, k the tail the forward keeps for the backward
    (the weight gradient's bytes: min(tokens, h) in fp32, min(tokens, 4h / (4 + e)) with
    the bf16 matmul output beside the fp32 logits), at 4 bytes a value (bf16: + e); the
    softmax block is at most one chunk of fp32. With the loss in the kernel (the default)
    nothing is kept and the gradients are formed in the forward: the chunk plus two softmax
    blocks of fp32; the larger of the two paths is counted. Plus the fp32 gradient of the
    hidden states 4*h per token (+ e*h for its cast), and of the output weight 4*V_pad/t*h
    (bf16: + a bf16 product and its fp32 copy per chunk, 6*V_pad/t*h)."""
    e = DTYPE_BYTES[a.dtype]
    v_local = padded_vocab(m.vocab, tp) // tp
    chunk_tokens = min(tokens, max(1, a.lp_chunk_bytes // (4 * v_local)))
    per_value = 4 if e == 4 else 4 + e
    kept_tokens = min(tokens, 4 * m.hidden // per_value)
    chunks = max(max(chunk_tokens, kept_tokens) * v_local * per_value,
                 chunk_tokens * v_local * (per_value + 4)) + chunk_tokens * v_local * 4
    grad_h = tokens * m.hidden * (4 + (e if e != 4 else 0))
    grad_w = v_local * m.hidden * (4 if e == 4 else 10)
    return int(chunks + grad_h + grad_w)


def batch_tensor_bytes(run: RunShape, dp: int) -> int:
    """The step's micro-batches of this DP rank, on the device for the whole training phase
    (built from the rollouts, so not during generation): tokens, targets, positions,
    sequence ids (int64) + loss mask, SGLang log-probs and their mask, old log-probs (fp32):
    48 bytes per token, sequences / DP * (prompt + response)."""
    return 48 * math.ceil(run.sequences / dp) * run.seq_len


def micro_batches_per_rank(run: RunShape, dp: int) -> int:
    """Micro-batches one DP rank runs per optimizer mini-batch:
    ceil(sequences / mini_batches / (DP * sequences per micro-batch)); packed, a row holds
    budget // (prompt + response) full-length sequences."""
    return max(1, math.ceil(run.sequences / run.mini_batches / (dp * run.seqs_per_micro_batch)))


STAGES = ("first", "middle", "last")


def stage_name(index: int, pp: int) -> str:
    """first (embeddings), middle, or last (output layer, loss); with p = 1 the one stage is
    ``last`` (it holds everything)."""
    if index == pp - 1:
        return "last"
    return "first" if index == 0 else "middle"


def _stage_index(stage, pp: int) -> int:
    if isinstance(stage, int):
        return stage
    return {"first": 0, "last": pp - 1}.get(stage, min(1, pp - 1))


def in_flight_micro_batches(pp: int, m_batches: int, stage) -> int:
    """1F1B keeps min(p - i, m) micro-batches' activations on stage i: p on the first
    stage, 1 on the last. ``stage``: the index i, or first / last."""
    i = _stage_index(stage, pp)
    return max(1, min(pp - i, m_batches))


def stage_activation_bytes(m: ModelShape, run: RunShape, lay: Layout, stage, a: Assumptions,
                           layers: Optional[int] = None) -> dict:
    """Activation-phase bytes of one GPU of ``stage`` (index or first/last) at its backward
    peak, with ``layers`` decoder layers (default: the largest stage's).

    Tokens of a micro-batch T: micro_batch * (prompt + response), or the packing budget
    (train.max_tokens_per_micro_batch). Saved: no recompute, in_flight * layers * T *
    layer_activation; full recompute, in_flight * layers * T * h*e (/t with SP: each layer's
    input) + one layer's activations recomputed. The last stage adds the final norm / loss
    per token. On top of the saved activations comes the larger of two moments: the fused
    kernel's backward scratch (last stage, first thing in the backward) and one layer's
    backward transient. The local spec adds its persistent score buffer (over a row: the
    packed row when packing)."""
    e = DTYPE_BYTES[a.dtype]
    sp = lay.sequence_parallel
    i = _stage_index(stage, lay.pp)
    last = i == lay.pp - 1
    tokens_mb = run.tokens_per_micro_batch
    row = run.row_len
    layers = stage_layers(m, lay.pp) if layers is None else layers
    flight = in_flight_micro_batches(lay.pp, micro_batches_per_rank(run, lay.dp), i)
    per_layer = (layer_activation_bytes(m, lay.tp, sp, row, a) * tokens_mb
                 + causal_mask_bytes(row, a))
    transient = backward_transient_bytes(m, lay.tp, row, a) * tokens_mb
    if lay.recompute:
        saved = flight * layers * tokens_mb * m.hidden * e / (lay.tp if sp else 1) + per_layer
    else:
        saved = flight * layers * per_layer
    saved += attention_buffer_bytes(m, lay.tp, run.rows_per_micro_batch, row, a)
    scratch = 0
    if last:
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


OFFLOAD_KEEPS = {"none": ("weights", "grads", "optimizer", "overhead"),
                 "state": ("weights", "overhead"), "all": ("overhead",)}
"""What a colocated trainer GPU keeps during generation per rollout.offload: the step's
batch is not built yet and activations are freed; ``state`` moves gradient buffers and
optimizer state to pinned host memory, ``all`` the weights too (the CUDA context, NCCL
buffers and allocator reserve, ``overhead``, stay)."""
OFFLOAD_MOVES = {"none": (), "state": ("grads", "optimizer"),
                 "all": ("weights", "grads", "optimizer")}


@dataclass
class StageMemory:
    stage: str
    terms: dict
    """Named byte counts; resident terms stay, activations/scratch are the training peak."""
    peak: int
    resident: int
    """What stays on the GPU outside training (weights, grads, optimizer, batch, overhead)."""
    layers: int = 0
    """Decoder layers of this stage."""
    stage_peaks: list = field(default_factory=list)
    """trainer_memory: every stage's peak, in pipeline order."""
    split: Optional[list] = None
    """trainer_memory: layers per stage when they differ (parallel.pp_layer_split)."""
    rollout_resident: dict = field(default_factory=dict)
    """trainer_memory: per rollout.offload, the most a trainer GPU keeps during generation."""
    offload_bytes: dict = field(default_factory=dict)
    """trainer_memory: per rollout.offload, the most one GPU copies to the host (and back)."""


def stage_memory(m: ModelShape, run: RunShape, lay: Layout, stage, a: Assumptions,
                 colocated: bool = False, layers: Optional[int] = None) -> StageMemory:
    """Peak bytes of one trainer GPU of ``stage`` (index or first/last) with ``layers``
    decoder layers: resident + max(activation phase, optimizer phase); colocated adds the
    released SGLang server's residual."""
    i = _stage_index(stage, lay.pp)
    name = stage_name(i, lay.pp)
    layers = stage_layers(m, lay.pp) if layers is None else layers
    params = stage_params(m, lay.tp, lay.pp, name, layers)
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
    terms.update(stage_activation_bytes(m, run, lay, i, a, layers))
    largest = padded_vocab(m.vocab, lay.tp) * m.hidden // lay.tp
    terms["optimizer_step_transient"] = optimizer_step_transient_bytes(
        params, largest, lay.dp, lay.distributed_optimizer, a)
    training = terms["activations"] + max(terms["logprob_scratch"],
                                          terms["backward_transient"])
    peak = resident + max(training, terms["optimizer_step_transient"])
    return StageMemory(stage=name, terms=terms, peak=peak, resident=resident, layers=layers)


def balanced_layer_split(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                         colocated: bool = False) -> Optional[list]:
    """Layers per stage when p does not divide L (else None): every stage gets L // p and
    the L % p extra layers go to the stages whose peak with one more layer is lowest (ties:
    the later stage). 1F1B keeps p - i micro-batches on stage i, so the first stages
    (which also hold the embeddings) are usually the fullest; the last holds one
    micro-batch but the output layer and the loss's working set, so it is computed, not
    assumed. Picking the lowest peaks-with-one-more-layer minimises the largest stage (an
    exchange argument: swapping a chosen stage for an unchosen one with a lower such peak
    never raises the maximum)."""
    base, extra = divmod(m.layers, lay.pp)
    if extra == 0:
        return None
    plus = [stage_memory(m, run, lay, i, a, colocated, base + 1).peak for i in range(lay.pp)]
    chosen = set(sorted(range(lay.pp), key=lambda i: (plus[i], -i))[:extra])
    return [base + (1 if i in chosen else 0) for i in range(lay.pp)]


def trainer_memory(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool = False, split: Optional[list] = None) -> StageMemory:
    """The fullest GPU of the layout over every pipeline stage, each with its layers of
    ``split`` (default: :func:`balanced_layer_split`, or L / p each); the result also
    carries every stage's peak, the split, and per rollout.offload what the fullest GPU
    keeps during generation and copies to the host."""
    if split is None:
        split = balanced_layer_split(m, run, lay, a, colocated)
    layers = split or [m.layers // lay.pp] * lay.pp
    stages = [stage_memory(m, run, lay, i, a, colocated, n) for i, n in enumerate(layers)]
    top = max(stages, key=lambda s: s.peak)
    top.stage_peaks = [s.peak for s in stages]
    top.split = list(split) if split else None
    top.rollout_resident = {mode: max(sum(s.terms[k] for k in keep) for s in stages)
                            for mode, keep in OFFLOAD_KEEPS.items()}
    top.offload_bytes = {mode: max(sum(s.terms[k] for k in moved) for s in stages)
                         for mode, moved in OFFLOAD_MOVES.items()}
    return top
