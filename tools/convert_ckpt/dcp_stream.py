"""Write a Megatron ``torch_dist`` checkpoint one tensor at a time.

``dist_checkpointing.save`` needs every tensor of a rank's shard in memory (its writer
stages the whole plan before the first byte is written). Here the model is built on the
``meta`` device instead: its sharded state dict carries Megatron's keys, global shapes,
offsets and replica ids without holding any weight. Megatron's own save steps plan the
checkpoint (factories, replica filtering, validation, conversion to PyTorch
ShardedTensors, ``MCoreSavePlanner``), so the files, ``.metadata``, ``common.pt`` and
``metadata.json`` are those ``dist_checkpointing.save`` would write. PyTorch's DCP
``FileSystemWriter`` then asks the planner for each tensor right before writing it
(``resolve_data``), and the planner produces it at that moment with ``load(name)``:
peak memory is about one parameter shard, not the model.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch


def _parts(sh) -> list:
    """The ShardedTensors a state-dict entry is saved as (a factory builds several)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(sh, ShardedTensorFactory):
        return [sh]
    built = sh.build()
    return list(built.values()) if isinstance(built, dict) else list(built)


def _sources(sharded_state_dict: dict, names) -> dict:
    """(checkpoint key, global offset) -> (state-dict name, factory or None, part index) of
    every tensor this rank may write."""
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                          ShardedTensorFactory)

    out = {}
    for name, sh in sharded_state_dict.items():
        if isinstance(sh, ShardedObject):
            continue  # serialized bytes, written as they are
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            raise TypeError(f"state dict entry {name!r} is a {type(sh).__name__}; expected a "
                            f"flat sharded state dict")
        if name not in names:
            raise KeyError(f"state dict tensor {name!r} is not a parameter; nothing to load "
                           f"it from")
        factory = sh if isinstance(sh, ShardedTensorFactory) else None
        for i, part in enumerate(_parts(sh)):
            out[(part.key, tuple(part.global_offset))] = (name, factory, i)
    return out


def _planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingSavePlanner(MCoreSavePlanner):
        """Megatron's save planner whose tensors are produced on demand."""

        def __init__(self, sources: dict, load: Callable, progress=None, **kwargs):
            super().__init__(**kwargs)
            self.sources, self.load, self.progress = sources, load, progress
            self._last = (None, None)  # a factory's parts come from one parameter in a row

        def _param(self, name: str) -> torch.Tensor:
            if self._last[0] != name:
                self._last = (None, None)  # release the previous parameter first
                self._last = (name, self.load(name))
            return self._last[1]

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name, factory, part = self.sources[(write_item.index.fqn,
                                                tuple(write_item.index.offset))]
            data = self._param(name)
            if factory is not None:  # e.g. the gate / up halves of a gated linear_fc1
                filled = copy.copy(factory)
                filled.data = data
                data = _parts(filled)[part].data
            chunk = write_item.tensor_data
            if self.progress is not None:
                self.progress.update(1)
            return data.to(chunk.properties.dtype).reshape(chunk.chunk.sizes).contiguous()

    return StreamingSavePlanner


def save_streaming(sharded_state_dict: dict, checkpoint_dir: str, load: Callable,
                   names, progress: bool = False) -> None:
    """Save ``sharded_state_dict`` (of a model built on ``meta``) as ``dist_checkpointing``
    would, producing each parameter's data with ``load(name)`` only when it is written.

    ``names``: the state-dict names ``load`` accepts (the model's parameters). Every rank of
    the default process group must call this.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_common_strategy, get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    sources = _sources(sharded_state_dict, set(names))  # before the factories are applied
    strategy = get_default_save_sharded_strategy()
    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    get_default_save_common_strategy().save_common(common, checkpoint_dir)
    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
        sharded, strategy.keep_only_main_replica)
    pyt_state_dict = mcore_to_pyt_state_dict(by_key, False)
    bar = None
    if progress:
        from tqdm import tqdm

        mine = sum(len(v.local_shards()) for v in pyt_state_dict.values()
                   if hasattr(v, "local_shards"))
        bar = tqdm(total=mine, desc="hf -> mcore", unit="tensor")
    planner = _planner_class()(sources, load, bar, flatten_state_dict=False,
                               dedup_replicated_tensors=not strategy.keep_only_main_replica)
    try:
        dcp_save(pyt_state_dict, planner=planner,
                 storage_writer=FileSystemWriter(checkpoint_dir, single_file_per_rank=True,
                                                 thread_count=1))
    finally:
        if bar is not None:
            bar.close()
    if dist.get_rank() == 0:
        save_config(CheckpointingConfig(strategy.backend, strategy.version), checkpoint_dir)
    dist.barrier()
