"""Atomic, resumable training checkpoints (Megatron dist_checkpointing + trainer state).

Layout under the checkpoint root::

    step_000020/
        mcore/               model + optimizer, Megatron dist_checkpointing (any TP/PP on load)
        trainer_state.json   step, data position, rollout counter, scheduler, metrics state
        rng/rank_00003.pt    Python / NumPy / torch / Megatron-tracker RNG states per rank
    latest                   name of the newest complete checkpoint (written last)

A save writes into ``.tmp_step_XXXXXX`` and renames it when every rank is done; ``latest``
moves after that, through its own temporary file. A process killed at any moment leaves
the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

# optimizer state saved per DP shard; reloadable when DP changes (see REFERENCE notes)
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
_STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the checkpoint ``latest`` names, or None when there is none."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not _STEP_RE.match(name) or not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint. "
                              f"Fix: point it at one of {list_checkpoints(root)} or remove it")
    return path


def list_checkpoints(root: str) -> list:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if _STEP_RE.match(n))


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_writer_manager = None


def _writer_queue_ends_with_this_process() -> None:
    """Megatron's torch_dist writer returns its results through a queue served by a
    multiprocessing Manager process that it starts at the first save and never stops: a
    killed rank would leave it behind, re-parented to init. Start that process here instead,
    set to exit with this one (the queue is Megatron's module global)."""
    global _writer_manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # another Megatron layout: its own queue, as before
        return
    if _writer_manager is not None or getattr(filesystem_async, "_results_queue", 1) is not None:
        return
    import multiprocessing
    import threading
    from multiprocessing.managers import SyncManager

    from srft_mcore.training.lifecycle import end_with_parent

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=end_with_parent,
                  initargs=(os.getpid(), threading.current_thread() is threading.main_thread()))
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: dict,
                    keep: int = 2) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    from megatron.core import dist_checkpointing

    _writer_queue_ends_with_this_process()

    rank = _rank()
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp_" + step_dir_name(step))
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
        os.makedirs(os.path.join(tmp, "mcore"))
    _barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_SHARDING)}
    dist_checkpointing.save(state, os.path.join(tmp, "mcore"))
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(trainer_state, step=step), f, indent=1, sort_keys=True)
        if os.path.exists(final):  # the same step saved again (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, "latest"), step_dir_name(step))
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str, model, optimizer, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Collective: restore model (+ optimizer, RNG) from ``path``; returns the trainer state.

    A missing, truncated or corrupt file raises :class:`CheckpointError` naming it and the
    other checkpoints to resume from; nothing is written.
    """
    from megatron.core import dist_checkpointing

    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    with _readable(path, "trainer_state.json"):
        with open(state_path) as f:
            trainer_state = json.load(f)
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    if load_optimizer:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=OPTIMIZER_SHARDING)
    with _readable(path, "mcore/ (model and optimizer tensors)"):
        loaded = dist_checkpointing.load(request, os.path.join(path, "mcore"))
    model.load_state_dict(loaded["model"])
    if load_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and os.path.isfile(rng_file):
        with _readable(path, os.path.relpath(rng_file, path)):
            set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def load_optimizer_state(path: str, model, optimizer) -> None:
    """Collective: only the optimizer state (Adam moments, step counts) of the trainer
    checkpoint ``path`` (``model.load_optimizer``: SFT->RL's RL run carries on with its SFT
    run's optimizer). Call before the lr scheduler is built, which sets this run's lr."""
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"model.load_optimizer=true needs model.load_mcore to be a trainer "
                              f"checkpoint (step_XXXXXX with trainer_state.json), got {path!r}. "
                              f"Fix: point model.load_mcore at one, or set "
                              f"model.load_optimizer=false")
    request = {"optimizer": optimizer.sharded_state_dict(model.sharded_state_dict(),
                                                         is_loading=True,
                                                         metadata=OPTIMIZER_SHARDING)}
    with _readable(path, "mcore/ (optimizer tensors)"):
        loaded = dist_checkpointing.load(request, os.path.join(path, "mcore"))
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])


class _readable:
    """Turn a failed read of a checkpoint file into one CheckpointError with the fix."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, CheckpointError):
            return False
        root = os.path.dirname(os.path.abspath(self.path))
        others = [c for c in list_checkpoints(root) if c != os.path.basename(self.path)]
        fix = (f"resume from an earlier checkpoint by writing its name ({', '.join(others)}) "
               f"into {os.path.join(root, 'latest')}" if others else
               "start a new run (a new logging.run_dir) or restore the files")
        raise CheckpointError(
            f"checkpoint {self.path} is damaged: reading {self.what} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}). "
            f"Fix: {fix}; nothing was changed") from exc


def stored_keys(mcore_dir: str) -> set:
    """Every key of a dist checkpoint, from its metadata alone (an object stored per shard,
    ``key/shard_<offset>_<shape>``, counts as ``key``)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(mcore_dir).read_metadata().state_dict_metadata
    return {k.split("/shard_")[0] for k in meta}


def model_weights_request(sharded_state_dict: dict, stored: set, renames: dict
                          ) -> tuple[dict, set]:
    """The load request for a model's sharded state dict against a checkpoint holding the keys
    ``stored``: tensors asked for under the checkpoint's own names (``renames``: model key ->
    stored key, from :func:`srft_mcore.models.name_map.checkpoint_renames`), and the
    ``_extra_state`` objects the checkpoint lacks left out (a TE model's norms keep one, the
    local spec's do not). Returns the request and the state-dict names left out."""
    import copy

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    request, skipped = {}, set()
    for name, sh in sharded_state_dict.items():
        if isinstance(sh, ShardedObject) and sh.key.endswith("_extra_state") \
                and sh.key not in stored:
            skipped.add(name)
            continue
        key = getattr(sh, "key", None)
        if key in renames:
            sh = copy.copy(sh)
            sh.key = renames[key]
        request[name] = sh
    return request, skipped


def load_model_weights(path: str, model, hf: Optional[dict] = None) -> str:
    """Load only the model weights from a trainer checkpoint (``step_XXXXXX``, e.g. the SFT
    run of SFT->RL) or from an ``srft-convert hf-to-mcore`` directory. Collective.

    A checkpoint of either layer spec loads into a model of either spec: with ``hf`` (the
    model's HF config) the checkpoint's tensor names are checked against the bridge's map
    (:func:`srft_mcore.models.name_map.checkpoint_naming`, one error naming the keys that do
    not fit) and asked for under the names it stores; ``_extra_state`` entries only one side
    has are left alone."""
    from megatron.core import dist_checkpointing

    from srft_mcore.models.name_map import BridgeError, checkpoint_naming, checkpoint_renames
    from srft_mcore.models.builder import unwrap_gpt

    if os.path.isdir(os.path.join(path, "mcore")):  # a trainer checkpoint
        ckpt_dir, kind = os.path.join(path, "mcore"), "trainer checkpoint"
    elif os.path.isfile(os.path.join(path, "metadata.json")):  # a converted checkpoint
        ckpt_dir, kind = path, "converted checkpoint"
    else:
        raise CheckpointError(f"model.load_mcore={path!r} is neither a trainer checkpoint "
                              f"(step_XXXXXX with mcore/) nor an srft-convert hf-to-mcore output "
                              f"(metadata.json). Fix: point it at one of those")
    stored = stored_keys(ckpt_dir)
    renames = {}
    if hf is not None:
        try:
            renames = checkpoint_renames(hf, checkpoint_naming(
                hf, stored, where=f"model.load_mcore={path!r}"))
        except BridgeError as e:
            raise CheckpointError(f"{e}. Fix: point model.load_mcore at a checkpoint of "
                                  f"model.hf_path's model") from None
    request, skipped = model_weights_request(model.sharded_state_dict(), stored, renames)
    if kind == "trainer checkpoint":
        loaded = dist_checkpointing.load({"model": request}, ckpt_dir)["model"]
    else:
        loaded = dist_checkpointing.load(request, ckpt_dir)
    missing, unexpected = unwrap_gpt(model).load_state_dict(loaded, strict=False)
    wrong = sorted(set(missing) - skipped) + sorted(unexpected)
    if wrong:
        raise CheckpointError(f"model.load_mcore={path!r}: the loaded state does not fit the "
                              f"model: {wrong[:8]}")
    return kind


def clean_stale(root: str) -> None:
    """Remove partial saves left by a killed run (rank 0, before training starts)."""
    if _rank() == 0 and os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
