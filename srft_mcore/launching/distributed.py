"""Process groups and seeding: torch.distributed (nccl | gloo) + Megatron ``parallel_state``."""
from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from srft_mcore.launching import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits; groups are passed explicitly to new code (bridge, loss, sync)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Optional[object]
    pp_group: Optional[object]
    dp_group: Optional[object]
    device: torch.device
    cpu_group: Optional[object] = None
    """A gloo group over all ranks for Python objects and CPU tensors, with the long
    ``wait_timeout_s``: ranks wait on it (not on NCCL) while rank 0 generates rollouts."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_rendezvous_store():
    """Let rank 0 of a new ``tcp://`` process group host its own store under torchrun.

    torchrun sets TORCHELASTIC_USE_AGENT_STORE, which makes rank 0 of *any* group created
    with ``init_method='tcp://...'`` connect to a store it expects the agent to host; for a
    group with outside processes (the SGLang weight-update group) nobody hosts it.
    """
    saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


def pick_backend(requested: str = "auto") -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA, which this machine does not have. "
                           "Fix: use parallel.backend=auto or gloo")
    return requested


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, through Megatron, the TP-aware CUDA tracker)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, backend: str = "auto",
                     seed: int = 1234, timeout_s: float = 1800.0,
                     wait_timeout_s: float = 7200.0) -> ParallelLayout:
    """Initialise torch.distributed from the torchrun environment and Megatron's groups.

    timeout_s bounds the training collectives; wait_timeout_s the gloo ``cpu_group`` on
    which ranks wait for rank 0's rollouts.

    Without RANK/WORLD_SIZE in the environment a single-rank group is created on a free
    loopback port, so the same code runs under ``python`` and under ``torchrun``.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = pick_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.apply()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise RuntimeError(f"world size {world} is not divisible by tp*pp*cp={tp * pp * cp}")

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp)
    set_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))
    return ParallelLayout(
        rank=dist.get_rank(), world_size=world, tp=tp, pp=pp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        device=device,
        cpu_group=cpu_group,
    )


def comm_device(group=None) -> torch.device:
    """The device a tensor must live on for a collective of ``group`` (cuda under NCCL)."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj, group=None, group_src: int = 0):
    """``obj`` from rank ``group_src`` of ``group`` (default: the world) to all its ranks."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=group_src)
    return box[0]


def all_gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` of ``group``, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
