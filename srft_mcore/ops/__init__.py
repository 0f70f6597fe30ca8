"""Fused operators of the trainer (vocab-parallel log-prob and entropy)."""
from srft_mcore.ops.logprob_entropy import (
    linear_vocab_parallel_logprob_entropy,
    linear_vocab_parallel_token_loss,
    reference_logprob_entropy,
    vocab_parallel_logprob_entropy,
)

__all__ = ["vocab_parallel_logprob_entropy", "linear_vocab_parallel_logprob_entropy",
           "linear_vocab_parallel_token_loss", "reference_logprob_entropy"]
