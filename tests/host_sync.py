"""Counting the host-device round trips of a piece of code, on CPU as on a GPU.

On a GPU a training step must not make the host wait for the device, except where it is
meant to (the step's one metrics reduction, the finite-gradient check, the optimizer's
norm). CUDA's own sync debug mode sees only real synchronisations, so on a CPU-only machine
it counts nothing. :class:`HostSyncCounter` instead counts the Python-level calls that
become a host-device round trip on a GPU, whatever the device they run on:

* ``readback``: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and the Python
  conversions ``bool()``, ``float()``, ``int()``, ``index()`` of a tensor (``if t > 0:``);
* ``from_python``: ``torch.tensor`` / ``torch.as_tensor`` of a Python scalar (a host
  tensor, that must then be copied to the device), or of any Python data with a device
  named (a blocking copy); collating lists into host tensors is not counted;
* ``move``: a blocking ``.to(device)`` / ``.cuda()`` / ``.copy_(src)`` that names a device.
  On CPU every device is the same one, so any blocking move that names a device is
  counted as if it crossed one: on a GPU such a call is either a copy from the host or a
  no-op, and the no-ops are removed from the code rather than allowed here.
  ``non_blocking=True`` moves are not counted (the batch's one transfer per micro-batch).

Only calls made by the project's own code (``srft_mcore/``, ``tools/``) are counted: on
CPU a tensor's future device cannot be told, and megatron-core's and torch's own per-call
read-backs act on host tensors (the RNG tracker's CPU-state check, the schedule's token
counter, Adam's step count). The GPU check counts real synchronisations there with CUDA's
sync debug mode. Each event keeps the caller's ``file:line``, so a failing test names the
culprit.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
READBACK = {_T.item, _T.tolist, _T.cpu, _T.numpy, _T.__bool__, _T.__float__, _T.__int__,
            _T.__index__}
FROM_PYTHON = {torch.tensor, torch.as_tensor}
MOVES = {_T.to, _T.cuda, _T.copy_}
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
PROJECT = tuple(os.path.join(_ROOT, d) + os.sep for d in ("srft_mcore", "tools"))


def _names_device(func, args, kwargs) -> bool:
    if func is _T.cuda:
        return True
    if func is _T.copy_:  # a copy between devices
        src = args[1] if len(args) > 1 else kwargs.get("src")
        return torch.is_tensor(src) and src.device != args[0].device
    if "device" in kwargs and kwargs["device"] is not None:
        return True
    return any(isinstance(a, (str, torch.device)) or torch.is_tensor(a) or
               (isinstance(a, int) and not isinstance(a, bool)) for a in args[1:2])


def _kind(func, args, kwargs):
    if func in READBACK:
        return "readback"
    if func in FROM_PYTHON:
        data = args[0] if args else kwargs.get("data")
        if torch.is_tensor(data):
            return None
        # a Python scalar becomes a host tensor to be copied; a list built on the host
        # (collation) is not a round trip until it is moved, unless a device is named
        scalar = isinstance(data, (bool, int, float, complex))
        return "from_python" if scalar or kwargs.get("device") is not None else None
    if func in MOVES and not kwargs.get("non_blocking", False) \
            and _names_device(func, args, kwargs):
        if func is _T.to and len(args) > 2 and args[2] is True:  # .to(device, non_blocking)
            return None
        return "move"
    return None


def _caller() -> tuple:
    """(absolute path, line) of the first frame outside this file and torch itself: the
    code that made the call."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return path, frame.f_lineno
        frame = frame.f_back
    return "?", 0


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...``; then ``c.count``, ``c.by_kind()``,
    ``c.by_site()`` (events per ``file:line``). scope: path prefixes of the callers that
    count (default: the project's packages); None counts every caller."""

    def __init__(self, scope: tuple | None = PROJECT):
        super().__init__()
        self.scope = scope
        self.events: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func, args, kwargs)
        if kind is not None:
            path, line = _caller()
            if self.scope is None or path.startswith(self.scope):
                self.events.append((kind, getattr(func, "__name__", str(func)),
                                    f"{os.path.relpath(path, _ROOT)}:{line}"))
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_kind(self) -> dict:
        return dict(Counter(kind for kind, _, _ in self.events))

    def by_site(self) -> dict:
        return dict(Counter(f"{name} at {site}" for _, name, site in self.events))


def count_host_syncs(fn, scope: tuple | None = PROJECT) -> HostSyncCounter:
    """Run ``fn()`` under a :class:`HostSyncCounter` and return it."""
    with HostSyncCounter(scope) as counter:
        fn()
    return counter
