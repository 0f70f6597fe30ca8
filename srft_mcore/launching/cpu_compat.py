"""The one place that adapts ``torch.cuda`` calls of megatron-core for CPU-only runs.

Megatron-core assumes CUDA in a handful of places that are not about computation. On a
machine without CUDA, :func:`apply` patches exactly those (megatron-core 0.16.x):

* ``rng``: ``tensor_parallel.model_parallel_cuda_manual_seed`` and the
  ``CudaRNGStatesTracker`` (used for TP-rank-specific init and dropout) read and write the
  CUDA RNG state through ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` and ``torch.cuda.manual_seed``: routed to the CPU generator.
* ``device``: ``torch.cuda.current_device()`` is the ``device=`` of buffers in
  ``GlobalMemoryBuffer`` (attention), the TP mappings, the pipeline p2p shape exchange and
  the DDP grad buffers: returns the CPU device.
* ``sync``: ``torch.cuda.synchronize()`` in ``dist_checkpointing`` (preload) and DDP:
  a no-op.
* ``stream``: ``torch.cuda.current_stream()`` in DDP grad sync: a stream that does nothing.
* ``literal``: literal ``device="cuda"`` / ``.cuda()`` in the pipeline schedules
  (``total_num_tokens``), the optimizer (``found_inf``, grad scaler), ``clip_grads`` and
  ``tensor_parallel.data``: a ``TorchFunctionMode`` rewrites them to CPU.
* ``type``: the DistributedOptimizer and ``clip_grads`` compare ``Tensor.type()`` with
  ``'torch.cuda.FloatTensor'``: the same mode reports CPU tensors under their CUDA names.

Nothing is patched when CUDA is available. The patches are process-wide; call
:func:`apply` once, before megatron builds models or optimizers.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

APPLIED: list = []
_mode = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _to_cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites ``device='cuda'``, ``.cuda()``, ``.to('cuda')`` and ``Tensor.type()`` names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)) \
                and not isinstance(args[1], bool):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                name = "torch.cuda." + name[len("torch."):]
            return name
        return func(*args, **kwargs)


class _NoopStream:
    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def apply() -> list:
    """Patch megatron-core's CUDA assumptions for a CPU run; returns the applied names."""
    global _mode
    if cuda_available() or APPLIED:
        return APPLIED
    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    APPLIED.append("rng")

    torch.cuda.current_device = lambda: torch.device("cpu")
    APPLIED.append("device")

    torch.cuda.synchronize = lambda device=None: None
    APPLIED.append("sync")

    torch.cuda.current_stream = lambda device=None: _NoopStream()
    APPLIED.append("stream")

    _mode = _CudaLiteralsToCpu()
    _mode.__enter__()
    APPLIED.extend(["literal", "type"])
    return APPLIED
