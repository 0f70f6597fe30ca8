"""Deterministic, resumable prompt order.

Each epoch is a permutation drawn from ``seed + epoch`` (numpy's legacy ``RandomState``,
whose stream numpy keeps stable across versions). A step takes the next ``batch_size``
positions; an epoch's remainder smaller than a batch is skipped (those records come back
in the next epoch's order), so a batch never mixes epochs. ``state_dict`` is (epoch,
position): a run restored from it draws exactly the batches the original run would have.
"""
from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, num_records: int, batch_size: int, seed: int = 1234):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_records < batch_size:
            raise ValueError(f"{num_records} records cannot fill one batch of {batch_size} "
                             f"prompts. Fix: lower train.prompts_per_step or add data")
        self.num_records = num_records
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.RandomState((self.seed + self.epoch) % (2 ** 32))
            self._order = rng.permutation(self.num_records)
        return self._order

    def next_batch(self, size: int = None) -> list:
        """Indices (into the dataset) of the next step's prompts; ``size``: that many instead
        of ``batch_size`` (rollout.dynamic_sampling's further draws, at most a batch)."""
        size = self.batch_size if size is None else size
        if self.position + size > self.num_records:
            self.epoch += 1
            self.position = 0
            self._order = None
        order = self._epoch_order()
        batch = order[self.position:self.position + size].tolist()
        self.position += size
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_records": self.num_records, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records", self.num_records) != self.num_records:
            raise ValueError(f"sampler state was saved for {state['num_records']} records, "
                             f"the dataset now has {self.num_records}: the data (or its "
                             f"length filter) changed since the checkpoint")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run "
                             f"uses {self.seed} (data.shuffle_seed)")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
