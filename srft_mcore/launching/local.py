"""Run a function on N local ranks (fresh processes, gloo or nccl) and collect results.

Used by ``srft-doctor``, the converter and the multi-rank tests: each rank gets the torchrun
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the
caller's environment as it is at the call, runs ``fn(*args)`` and sends back its return
value (which must pickle). A rank that raises makes :func:`spawn_ranks` raise with that
rank's traceback; the others are terminated.

On a machine without CUDA, ranks are forked from a fork server that has imported torch and
megatron-core once: a rank then starts in milliseconds instead of the seconds each import
costs, and it is still a fresh process (no process group, nothing run). With CUDA they are
spawned.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

from srft_mcore.launching.distributed import free_port


class RankFailed(RuntimeError):
    pass


# imported once by the fork server; a missing one is skipped (multiprocessing ignores it)
PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state",
           "megatron.core.models.gpt", "transformers"]


def _context():
    import torch

    if torch.cuda.is_available():
        # a preloaded import may touch the CUDA driver (capability probes), and a forked
        # rank cannot use CUDA after that: GPU ranks start fresh (seconds next to CUDA's)
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_main(fn, args, rank, world_size, port, results, env, kwargs=None):
    # the fork server holds the environment of its own start: take the caller's as it is now
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        # plain pickle: torch's queue reductions would share tensors through this process's
        # file descriptors, which are gone once it exits before the parent reads them
        out = pickle.dumps(fn(*args, **(kwargs or {})))
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from srft_mcore.launching.distributed import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def spawn_ranks(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600.0,
                env: dict | None = None, kwargs: dict | None = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the results by
    rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(env or {})}
    procs = [ctx.Process(target=_rank_main,
                         args=(fn, args, r, world_size, port, results, env, kwargs),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailed(f"ranks {sorted(set(range(world_size)) - set(out))} did not "
                                 f"finish within {timeout_s:.0f}s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in out]
                if dead:
                    raise RankFailed(f"rank {dead[0]} exited with code "
                                     f"{procs[dead[0]].exitcode} without a result")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30 if len(out) == world_size else 1)
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
    return [out[r] for r in range(world_size)]
