"""The policy's forward: a Megatron GPTModel stage that ends in (log-prob, entropy), not logits.

Non-last pipeline stages return their hidden states exactly as ``GPTModel.forward`` does,
so :func:`policy_forward` can be the model call of a ``forward_step_func`` in Megatron's
forward-backward schedules. The last stage runs the same embedding/decoder path and then
the fused vocab-parallel kernel on the output layer's weight (tied or untied) instead of
``output_layer`` + logits.

Shape suffixes: b batch, s sequence, h hidden, v vocabulary shard.
"""
from __future__ import annotations

from typing import Optional

import torch

from srft_mcore.models.builder import unwrap_gpt
from srft_mcore.ops import (
    linear_vocab_parallel_logprob_entropy,
    linear_vocab_parallel_token_loss,
    vocab_parallel_logprob_entropy,
)


def output_weight(gpt) -> torch.Tensor:
    """[V/tp, h] weight of the output projection (the word embeddings when tied)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def policy_forward(model, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor,
                   targets_bs: Optional[torch.Tensor], *, vocab_size: int, tp_group=None,
                   temperature: float = 1.0, fused: str = "linear",
                   chunk_size: Optional[int] = None, entropy_grad: bool = False,
                   attention_mask=None, packed: Optional[dict] = None, token_loss=None,
                   token_loss_misses: Optional[torch.Tensor] = None):
    """Run this rank's stage; on the last stage return (logp_bs, entropy_bs) for targets.

    tp_group: the tensor-parallel group (default: the model's ``pg_collection.tp``).

    vocab_size: the true (unpadded) vocabulary. fused: ``linear`` (hidden states and the
    output weight go straight into the kernel; no logits are stored) or ``logits`` (Megatron's
    output layer, then the chunked kernel on its vocab-sharded logits). entropy_grad: let
    gradients flow through the entropy (needed only for an entropy bonus). With
    ``targets_bs=None`` the model's ordinary forward runs and the last stage returns logits.
    packed: rows holding several sequences (``seq_ids`` [b, s]; ``cu_seqlens`` and
    ``max_seqlen`` for one-row THD micro-batches): attention stays inside each sequence and
    positions restart (see models/packing.py).
    token_loss: ``f(logp_bs, entropy_bs) -> scalar``, a sum of per-token terms; the last
    stage then returns ``(loss, logp_bs, entropy_bs)``, the loss carrying the gradient (with
    ``fused=linear`` formed inside the kernel, see ``linear_vocab_parallel_token_loss``) and
    logp / entropy detached, for metrics. token_loss_misses: the kernel's check that the
    loss is a sum of per-token terms, counted on the device (see the kernel's ``misses``).
    """
    from srft_mcore.models import packing

    gpt = unwrap_gpt(model)
    if packed is None and (targets_bs is None or not gpt.post_process):
        return model(tokens_bs, position_ids_bs, attention_mask)
    if gpt.config.mtp_num_layers:
        raise NotImplementedError("policy_forward does not support multi-token prediction")

    # GPTModel.forward up to the decoder output (megatron-core 0.16), then our own head
    thd = None
    if packed is not None and packing.uses_te(gpt):
        thd = packing.thd_params(packed["cu_seqlens"], packed["max_seqlen"])
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, seq_len_offset, \
        padding_mask = gpt._preprocess(input_ids=tokens_bs, position_ids=position_ids_bs,
                                       packed_seq_params=thd)[:6]
    if packed is not None and thd is None:
        attention_mask = packing.block_causal_mask(packed["seq_ids"])
        if rotary_pos_emb is not None:
            rotary_pos_emb = packing.rotary_for_positions(gpt, position_ids_bs)
    hidden_sbh = gpt.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                             rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                             rotary_pos_sin=rotary_pos_sin, sequence_len_offset=seq_len_offset,
                             padding_mask=padding_mask, packed_seq_params=thd)
    if not gpt.post_process or targets_bs is None:
        return hidden_sbh
    if tp_group is None:  # the model's own TP group, as its output layer uses it
        tp_group = gpt.pg_collection.tp
    targets_sb = targets_bs.t()
    common = dict(vocab_size=vocab_size, tp_group=tp_group, temperature=temperature,
                  chunk_size=chunk_size, entropy_grad=entropy_grad)
    if fused == "logits":
        logits_sbv, _ = gpt.output_layer(hidden_sbh, weight=output_weight(gpt)
                                         if gpt.share_embeddings_and_output_weights else None)
        logp_sb, ent_sb = vocab_parallel_logprob_entropy(logits_sbv, targets_sb, **common)
    elif fused == "linear":
        sequence_parallel = gpt.config.sequence_parallel
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # its backward reduce-scatters, which also sums the vocabulary shards' parts
            hidden_sbh = gather_from_sequence_parallel_region(hidden_sbh, True, tp_group)
        common.update(reduce_hidden_grad=not sequence_parallel)
        if token_loss is not None:  # the kernel's tokens are [s, b]; the loss's [b, s]
            loss, logp_sb, ent_sb = linear_vocab_parallel_token_loss(
                hidden_sbh, output_weight(gpt), targets_sb,
                lambda lp_sb, h_sb: token_loss(lp_sb.t(), h_sb.t()),
                misses=token_loss_misses, **common)
            return loss, logp_sb.t(), ent_sb.t()
        logp_sb, ent_sb = linear_vocab_parallel_logprob_entropy(
            hidden_sbh, output_weight(gpt), targets_sb, **common)
    else:
        raise ValueError(f"fused must be 'linear' or 'logits', got {fused!r}")
    if token_loss is not None:
        return token_loss(logp_sb.t(), ent_sb.t()), logp_sb.t().detach(), ent_sb.t().detach()
    return logp_sb.t(), ent_sb.t()
