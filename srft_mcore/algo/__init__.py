"""SRFT algorithm pieces: group advantages and the per-token objective.

The names below load on first use, so that ``srft_mcore.algo.defaults`` (read by the
config) does not import torch."""
import importlib

_NAMES = {"group_advantages": "advantages", "BatchTotals": "losses", "batch_totals": "losses",
          "make_loss_func": "losses", "reduce_metrics": "losses", "srft_loss": "losses"}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"srft_mcore.algo.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'srft_mcore.algo' has no attribute {name!r}")
