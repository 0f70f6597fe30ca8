"""Packed rows: several sequences in one row, attention kept inside each sequence.

Two ways, one result (the packed log-probs equal the unpacked ones):
- ``thd`` (transformer-engine spec, GPU): the row becomes TE's THD layout described by
  ``PackedSeqParams`` (cumulative sequence lengths); TE's attention and Megatron's RoPE
  restart at each sequence.
- ``mask`` (the local spec, CPU or GPU without TE): a block-diagonal causal mask
  [b, 1, s, s] and rotary embeddings looked up from each position's own index, so a
  sequence sees the same angles it would see alone in a row.

Shape suffixes: b rows, s positions, d rotary dimension.
"""
from __future__ import annotations

import torch


def block_causal_mask(seq_ids_bs: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is masked: position i sees j iff j <= i and
    both belong to the same sequence (padding, id -1, forms a block of its own)."""
    s = seq_ids_bs.shape[1]
    same_bss = seq_ids_bs.unsqueeze(-1) == seq_ids_bs.unsqueeze(-2)
    causal_ss = torch.ones(s, s, dtype=torch.bool, device=seq_ids_bs.device).tril()
    return ~(same_bss & causal_ss).unsqueeze(1)


def rotary_for_positions(gpt, position_ids_bs: torch.Tensor) -> torch.Tensor:
    """Megatron's rotary embedding [s, b, 1, d] for explicit per-row positions, read from
    the same table the unpacked forward uses (angles identical to the bit). Positions are
    below the row length s (they restart at each sequence)."""
    table_pd = gpt.rotary_pos_emb(position_ids_bs.shape[1])[:, 0, 0, :]
    return table_pd[position_ids_bs.t()].unsqueeze(2)


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """``PackedSeqParams`` (THD) for one packed row: cumulative segment lengths (every
    sequence and the padding tail) in int32, as the batching computed them on the host."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def uses_te(gpt) -> bool:
    """Whether the model's layers come from transformer-engine (THD packing available)."""
    layer = gpt.decoder.layers[0] if len(gpt.decoder.layers) else None
    attn = getattr(getattr(layer, "self_attention", None), "core_attention", None)
    return attn is not None and type(attn).__module__.startswith(
        ("megatron.core.extensions.transformer_engine", "transformer_engine"))
