"""A trainer rank's lifetime: it ends with its launcher, and one trainer owns a run directory.

Usage (``trainer.main`` does both)::

    from srft_mcore.training.lifecycle import lock_run_dir, watch_launcher

    watch_launcher()                  # under torchrun: die when the torchrun agent dies
    lock = lock_run_dir(run_dir)      # rank 0: raises RunDirLocked if another trainer runs there
    ...
    lock.release()                    # or let the process exit

torchrun starts every rank in its own session, so ``kill -9`` on the launcher's process group
(or a closed terminal that only reaches torchrun) leaves the ranks, and rank 0's SGLang
servers, training on into the same run directory. :func:`watch_launcher` arms two guards:

* ``PR_SET_PDEATHSIG`` = SIGKILL (Linux): the kernel kills the rank the moment its launcher
  dies, whatever the rank is doing (a collective waiting on dead peers cannot hold it). SGLang
  servers launched from the main thread carry their own death signal (rollout/server.py), so
  they die with the rank.
* a daemon thread that polls ``os.getppid()``: it covers what the signal does not (no prctl
  outside Linux; the signal can fire only for a parent that is alive when it is armed); it
  stops this process's SGLang servers and exits.

Only ranks launched by torchrun are armed: a single-process run has no ranks to orphan, and
its parent (a shell, ``nohup``) may legitimately go away first.

:func:`lock_run_dir` takes an exclusive ``flock`` on ``<run_dir>/run.lock`` and writes the
holder's pid and host into it. The kernel drops the lock when the holder exits, however it
dies, so a stale lock file never blocks a later run.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime
from typing import Callable, Optional

from srft_mcore.config import ConfigError

LOCK_NAME = "run.lock"
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
_watching = False


# --------------------------------------------------------------------------- launcher death
def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(force: bool = False, death_signal: bool = True,
                   poll_s: float = POLL_S) -> bool:
    """Make this process end when its parent (the launcher) dies; True when armed.

    Armed under torchrun, or anywhere with ``force``. ``death_signal=False`` leaves only the
    polling thread (tests use it to exercise that path)."""
    global _watching
    if _watching or not (force or launched_by_torchrun()):
        return _watching
    follow_parent(os.getppid(), _launcher_died, poll_s, death_signal)
    _watching = True
    return True


def follow_parent(parent: int, on_death: Callable[[int], None], poll_s: float = POLL_S,
                  death_signal: bool = True) -> None:
    """End this process with its parent: ``PR_SET_PDEATHSIG`` = SIGKILL (Linux), and a
    daemon thread that calls ``on_death(parent)`` once ``os.getppid()`` changes (no prctl
    elsewhere; the signal only fires for a parent alive when it is armed)."""
    if death_signal:
        _set_parent_death_signal(signal.SIGKILL)
    # the parent may have died before the signal was armed: then we are already re-parented
    if parent == 1 or os.getppid() != parent:
        on_death(parent)
    threading.Thread(target=_poll_parent, args=(parent, poll_s, on_death),
                     name="srft-parent-watch", daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(launcher: int, poll_s: float, on_death: Callable[[int], None]) -> None:
    while os.getppid() == launcher:
        time.sleep(poll_s)
    on_death(launcher)


def _launcher_died(launcher: int) -> None:
    """Stop this process's SGLang servers, then exit at once: the main thread may be blocked
    in a collective whose peers are gone, so there is no unwinding to wait for."""
    rank = os.environ.get("RANK", "0")
    _say(f"[srft] rank {rank}: the launcher (pid {launcher}) is gone; stopping this rank "
         f"and its SGLang servers")
    servers = sys.modules.get("srft_mcore.rollout.server")  # imported only if any were started
    if servers is not None:
        try:
            servers.stop_all()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(1)


def end_with_parent(parent: int, death_signal: bool = True) -> None:
    """Initializer of a helper process (e.g. a multiprocessing Manager started by a rank):
    exit as soon as ``parent`` is gone. ``death_signal`` only when the parent starts it from
    its main thread (the signal follows the starting thread, not the process)."""
    follow_parent(parent, lambda _: os._exit(0), death_signal=death_signal)


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the launcher's end of the pipe may be gone with it
        pass


# --------------------------------------------------------------------------- run-directory lock
class RunDirLocked(ConfigError):
    """Another live trainer holds the run directory."""


class RunDirLock:
    """An exclusive flock on ``<run_dir>/run.lock``, held until :meth:`release` or exit."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str) -> RunDirLock:
    """Take ``run_dir`` for this process, or raise :class:`RunDirLocked` naming the holder.

    Creates ``run_dir`` if needed; a refused call changes nothing in it. On a filesystem
    without flock support the run goes on unlocked, with a warning."""
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"config error: logging.run_dir={run_dir!r} is a file, not a "
                          f"directory. Fix: choose another logging.run_dir")
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:
        raise ConfigError(f"config error: logging.run_dir={run_dir!r}: cannot create "
                          f"{path} ({e.strerror}). Fix: choose a writable logging.run_dir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(_locked_message(run_dir, holder)) from None
        os.close(fd)
        _say(f"[srft] warning: cannot lock {path} ({e.strerror}): this filesystem has no "
             f"flock, so a second trainer on this run directory would not be refused")
        return RunDirLock(path, None)
    _write_holder(fd)
    return RunDirLock(path, fd)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):  # being written this instant, or not ours
        return {}


def _locked_message(run_dir: str, holder: dict) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    if pid is not None:
        who = f"pid {pid} on host {host}, started {holder.get('started', '?')}"
        stop = f"stop it (kill {pid} on {host})"
    else:
        who = f"holder unknown: see {os.path.join(run_dir, LOCK_NAME)}"
        stop = "stop it"
    return (f"logging.run_dir={run_dir!r} is in use by another trainer ({who}); two trainers "
            f"on one run directory would write over each other's metrics and checkpoints. "
            f"Fix: wait for that run to end, {stop}, or choose another logging.run_dir; "
            f"nothing was changed")
