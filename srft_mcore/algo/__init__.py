"""SRFT algorithm pieces: group advantages and the per-token objective."""
from srft_mcore.algo.advantages import group_advantages
from srft_mcore.algo.losses import (
    BatchTotals,
    batch_totals,
    make_loss_func,
    reduce_metrics,
    srft_loss,
)

__all__ = ["group_advantages", "BatchTotals", "batch_totals", "make_loss_func",
           "reduce_metrics", "srft_loss"]
