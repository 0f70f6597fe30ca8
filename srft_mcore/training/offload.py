"""Trainer state offload while colocated SGLang servers generate (``rollout.offload``).

With ``rollout.weight_sync=tensor`` the servers share the trainer's GPUs. While they
generate, the trainer needs none of its fp32 gradient buffers, Adam moments or fp32 master
weights (``state``), nor, once the servers hold them, its own weights (``all``).
:class:`StateOffloader` copies them into pinned host buffers (allocated once, reused every
step) and frees the device memory; :meth:`~StateOffloader.restore` brings them back
before training.

The memory is freed at the storage level (``untyped_storage().resize_(0)``), not by moving
tensors: Megatron keeps many views of the same memory (parameters are views into the DDP
``param_data`` buffer, ``main_grad`` into ``grad_data``, the optimizer's groups hold the
parameters, the distributed optimizer's shards are views), and every one of them stays the
same object over the same storage. Each storage is copied once, whole, however many views
it has. On CPU the same code runs (the host copy is a separate tensor), so the mechanism is
tested without a GPU.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Optional

import torch
import torch.distributed as dist


def resolve_offload(rollout_cfg, cuda: Optional[bool] = None) -> str:
    """``rollout.offload`` with ``auto`` resolved: ``state`` when the servers share the
    trainer's GPUs (``weight_sync=tensor``) on CUDA, else ``none``. Explicit values stay (on
    CPU too, where colocated runs exercise the same code)."""
    mode = rollout_cfg.offload
    if mode != "auto":
        return mode
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "state" if rollout_cfg.weight_sync == "tensor" and cuda else "none"


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (every view of it included)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _storages(tensors: Iterable) -> dict:
    """The distinct storages under ``tensors``, keyed by the storage object's identity
    (stable while its memory is freed and reallocated, unlike the data pointer)."""
    out = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            out.setdefault(s._cdata, s)
    return out


def _rss_bytes() -> int:
    """This process's resident set now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StateOffloader:
    """Moves a policy's training state to host memory and back.

    ``model_chunks``: the trained model (Megatron DDP; its grad buffers are state) and any
    frozen one (the KL reference: weights only). ``optimizer``: Megatron's (chained,
    float16, fp32 or distributed) optimizer. ``what``: ``none`` | ``state`` (gradient
    buffers, Adam moments, fp32 master weights) | ``all`` (that and the weights).

    :meth:`offload` and :meth:`restore` are idempotent; the tensors are collected at each
    offload, so Adam state created by the first step is moved from then on. :meth:`mark`
    starts a memory phase (``train`` / ``rollout``); :meth:`metrics` reports each phase's
    peak and the offload's time and bytes since the last call.
    """

    def __init__(self, model_chunks, optimizer, what: str = "state"):
        if what not in ("none", "state", "all"):
            raise ValueError(f"rollout.offload={what!r}: expected none, state or all "
                             f"(auto is resolved by resolve_offload)")
        self.chunks = [c for c in model_chunks if c is not None]
        self.optimizer = optimizer
        self.what = what
        self._moved: dict = {}  # key -> (storage, bytes) of what is on the host now
        self._host: dict = {}  # key -> host buffer, allocated once
        self._seconds = 0.0
        self._bytes = 0
        self._phase: Optional[str] = None
        self._phase_rss = 0
        self._peaks: dict = {}
        self.peak_gb = 0.0
        """The largest peak seen at any mark (CUDA's own counter is reset per phase)."""

    @property
    def active(self) -> bool:
        return self.what != "none"

    # ------------------------------------------------------------------ what moves
    def _weight_storages(self) -> dict:
        tensors = []
        for chunk in self.chunks:
            tensors += list(chunk.parameters())
            for buf in _ddp_buffers(chunk):  # distributed optimizer: the params' flat buffer
                tensors.append(buf.param_data)
        return _storages(tensors)

    def _state_storages(self) -> dict:
        tensors = []
        for chunk in self.chunks:
            tensors += [buf.grad_data for buf in _ddp_buffers(chunk)]
        for opt in _torch_optimizers(self.optimizer):
            for group in opt.param_groups:  # fp32 master weights (mixed precision) and grads
                for p in group["params"]:
                    tensors += [p, p.grad]
            for state in opt.state.values():  # exp_avg, exp_avg_sq, step (created lazily)
                tensors += [v for v in state.values() if torch.is_tensor(v)]
        found = _storages(tensors)
        # fp32 training: the optimizer's params are the weights themselves, which stay
        for key in self._weight_storages():
            found.pop(key, None)
        return found

    # ------------------------------------------------------------------ moving
    def offload(self, weights: bool = True) -> int:
        """Copy the state (``all`` and ``weights``: the weights too; the sync must have read
        them) to host buffers and free its device memory. Returns the bytes moved now.
        (A storage that cannot be resized, e.g. one borrowed from numpy, stays.)"""
        if not self.active:
            return 0
        t0 = time.perf_counter()
        found = self._state_storages()
        if self.what == "all" and weights:
            found.update(self._weight_storages())
        todo = [(k, s) for k, s in found.items()
                if k not in self._moved and s.nbytes() > 0 and s.resizable()]
        for key, storage in todo:
            n = storage.nbytes()
            host = self._host.get(key)
            if host is None or host.numel() != n:
                host = torch.empty(n, dtype=torch.uint8,
                                   pin_memory=storage.device.type == "cuda")
                self._host[key] = host
            host.copy_(_as_bytes(storage), non_blocking=True)
        cuda = any(s.device.type == "cuda" for _, s in todo)
        if cuda:
            torch.cuda.synchronize()  # the copies have landed before the memory goes
        moved = 0
        for key, storage in todo:
            n = storage.nbytes()
            self._moved[key] = (storage, n)
            storage.resize_(0)
            moved += n
        if cuda:
            torch.cuda.empty_cache()  # give the blocks back to the driver: the servers use them
        self._seconds += time.perf_counter() - t0
        self._bytes += moved
        return moved

    def restore(self) -> int:
        """Reallocate every offloaded storage and copy its content back, bit for bit; every
        view of it is valid again. Returns the bytes restored."""
        if not self._moved:
            return 0
        t0 = time.perf_counter()
        cuda = False
        restored = 0
        for key, (storage, n) in self._moved.items():
            storage.resize_(n)
            _as_bytes(storage).copy_(self._host[key], non_blocking=True)
            cuda = cuda or storage.device.type == "cuda"
            restored += n
        if cuda:
            torch.cuda.synchronize()
        self._moved.clear()
        self._seconds += time.perf_counter() - t0
        return restored

    # ------------------------------------------------------------------ memory per phase
    def mark(self, phase: str) -> None:
        """End the current memory phase (its peak is kept for :meth:`metrics`) and start
        ``phase``. CUDA: the allocator's peak since the mark; CPU: the process's resident set
        at the two marks (the host copies live in the same process there)."""
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            rss = 0
        else:
            rss = _rss_bytes()
            peak = max(self._phase_rss, rss)
        gb = peak / 1e9
        self.peak_gb = max(self.peak_gb, gb)
        if self._phase is not None:
            self._peaks[self._phase] = max(self._peaks.get(self._phase, 0.0), gb)
        self._phase, self._phase_rss = phase, rss

    def metrics(self, group=None) -> dict:
        """``mem/<phase>_peak_gb`` of the phases ended since the last call (the largest over
        the ranks of ``group``; collective when distributed), ``offload/seconds`` (copies both
        ways) and ``offload/bytes`` (to the host); then reset."""
        names = sorted(self._peaks)
        if names and dist.is_initialized():
            values = torch.tensor([self._peaks[n] for n in names], dtype=torch.float64)
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
            self._peaks = dict(zip(names, values.tolist()))
        out = {f"mem/{n}_peak_gb": v for n, v in self._peaks.items()}
        out.update({"offload/seconds": self._seconds, "offload/bytes": float(self._bytes)})
        self._peaks, self._seconds, self._bytes = {}, 0.0, 0
        return out


def _ddp_buffers(chunk) -> list:
    """Megatron DDP's param-and-grad buffers (dense and expert); none for a plain module."""
    found = []
    for name in ("buffers", "expert_parallel_buffers"):  # (a plain module's buffers() is
        value = getattr(chunk, name, None)                # a method: not these)
        if isinstance(value, (list, tuple)):
            found += list(value)
    return found


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside Megatron's wrapper (one per chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(c, "optimizer", c) for c in chained]
