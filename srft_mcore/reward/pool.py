"""Rewards scored in worker processes, each answer with a time limit.

A reward function that hangs (a pathological LaTeX answer sends sympy into a search that
never ends, or a regex into catastrophic backtracking) would stall rank 0, and with it every
rank waiting for the step's rewards. math-verify's own timeouts use SIGALRM, which only a
process's main thread may set: under ``rollout.overlap`` the reward runs in a background
thread, where they are off. :class:`RewardPool` scores in ``workers`` processes instead:

- each worker is a fresh interpreter (exec, as multiprocessing's ``spawn``: nothing of the
  trainer's threads, locks or CUDA state is inherited; unlike ``spawn`` it does not re-import
  the parent's ``__main__``, which for the trainer would load torch into every worker). It
  resolves ``reward.fn`` by its spec (:func:`~srft_mcore.reward.get_reward_fn`) with the
  parent's ``sys.path`` and scores in its own main thread, so math-verify's timeouts work;
- a batch is spread over all workers, one answer per message; an answer not scored within
  ``timeout_s`` gets its worker killed (SIGKILL to that child's pid) and replaced, and scores
  0.0; :meth:`RewardPool.score` returns the count of such timeouts with the scores;
- the rules of :func:`~srft_mcore.reward.score_batch` hold: a truncated response
  (``finish_reason == "length"``) scores 0 without being sent; a function that raises or
  returns a non-finite non-number raises :class:`~srft_mcore.reward.RewardError` naming the
  sample (after the batch's other answers in flight are collected, so the pool stays usable);
- workers die with the parent: ``PR_SET_PDEATHSIG`` on Linux (armed by each worker; all
  workers are started from one long-lived thread of the pool, because the kernel sends that
  signal when the *thread* that forked the child ends, and replacements are made in whatever
  thread is scoring), a thread polling the parent's pid elsewhere, and EOF on the channel.
  :meth:`RewardPool.close` (also run at exit and when the pool is garbage collected) kills and
  reaps them.

A spec the workers cannot resolve although this process can (a reward registered at runtime
with :func:`~srft_mcore.reward.register_reward`, which a fresh interpreter does not run) is
not an error: :func:`open_pool` logs why and returns None, and the caller scores in-process,
without the time limit (define the function in an importable module and use
``reward.fn=module:function`` to get it back).

Scoring is serialized by a lock: the trainer's main thread and the overlapped rollout's
background thread may both call :meth:`RewardPool.score`, one batch at a time.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, Pipe, wait
from typing import Callable, Optional, Sequence

from srft_mcore.reward import (RewardError, RewardFn, check_batch, get_reward_fn, is_truncated,
                               math_reward, score_one)

_logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long a new worker may take to import and resolve the reward (not the answer's limit:
the clock of an answer starts when it is sent to a worker that is ready)."""

_BOOT = "import sys; from srft_mcore.reward.pool import worker_main; worker_main(sys.argv[1:])"


class WorkerSpecError(RewardError):
    """The workers cannot resolve the reward spec (this process may: runtime registration)."""


class _Worker:
    """One child process and this process's end of its channel."""

    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc, self.conn = proc, conn
        self.ready = False
        self.start_deadline = time.monotonic() + START_TIMEOUT_S
        self.task: Optional[tuple] = None  # (batch id, sample index, deadline) while scoring

    def kill(self) -> None:
        # our own unreaped child: its pid cannot have been reused
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered yet
            pass
        self.conn.close()


def _kill_all(workers: list, spawner: ThreadPoolExecutor) -> None:
    """Kill and reap every worker (close(), exit, garbage collection)."""
    while workers:
        workers.pop().kill()
    spawner.shutdown(wait=False)


class RewardPool:
    """``workers`` processes scoring ``spec`` (a registered name or ``module:function``),
    each answer within ``timeout_s`` seconds or 0.0.

    Raises :class:`WorkerSpecError` when a worker cannot resolve ``spec`` and RewardError
    when a worker does not start; ``log`` gets one line per timeout.
    """

    def __init__(self, spec: Optional[str] = "math", workers: int = 2, timeout_s: float = 10.0,
                 log: Optional[Callable[[str], None]] = None):
        if int(workers) < 1:
            raise RewardError(f"RewardPool: workers={workers!r} must be >= 1 (score "
                              f"in-process with score_batch for none)")
        if not 0 < timeout_s < float("inf"):
            raise RewardError(f"RewardPool: timeout_s={timeout_s!r} must be a finite number > 0")
        self.spec = "math" if spec is None else spec
        get_reward_fn(self.spec)  # a spec that is wrong everywhere fails here, in the caller
        self.size, self.timeout_s = int(workers), float(timeout_s)
        self.log = log or _logger.warning
        self.timeouts_total = 0
        self._batch = 0
        self._lock = threading.Lock()  # one batch at a time
        self._spawn_lock = threading.Lock()  # no new worker once close() began
        self._closed = False
        # every worker is forked by this one thread (see the module docstring: PDEATHSIG)
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, self._spawner)
        try:
            self._workers.extend(self._spawn() for _ in range(self.size))
            self._await_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ processes
    def _spawn(self) -> _Worker:
        with self._spawn_lock:
            if self._closed:
                raise RewardError("RewardPool is closed")
            return self._spawner.submit(self._start_worker).result()

    def _start_worker(self) -> _Worker:
        ours, theirs = Pipe(duplex=True)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root,
                                                       env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        # the spec resolves with this process's import path (a test's, a user's PYTHONPATH)
        ours.send({"spec": self.spec, "sys_path": [p for p in sys.path if isinstance(p, str)]})
        return _Worker(proc, ours)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        if self._closed:  # close() in another thread: it has killed (and dropped) them all
            raise RewardError("RewardPool.score: the pool was closed while scoring")
        self._workers[self._workers.index(w)] = self._spawn()

    def _await_ready(self) -> None:
        while not all(w.ready for w in self._workers):
            self._wait_and_handle(batch=None, out=None, errors={})

    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return [w.proc.pid for w in self._workers if w.proc.poll() is None]

    # ------------------------------------------------------------------ scoring
    def score(self, responses: Sequence[str], answers: Sequence[str],
              prompts: Optional[Sequence[Optional[str]]] = None,
              finish_reasons: Optional[Sequence[Optional[str]]] = None) -> tuple:
        """``(scores, timeouts)``: one float per response as :func:`score_batch` gives, and
        how many answers hit ``timeout_s`` (each scored 0.0). Thread-safe; batches queue."""
        prompts, finish_reasons = check_batch(responses, answers, prompts, finish_reasons)
        out = [0.0] * len(responses)
        todo = collections.deque(
            (i, r, a, p) for i, (r, a, p, f) in enumerate(zip(responses, answers, prompts,
                                                               finish_reasons))
            if not is_truncated(f))
        with self._lock:
            if self._closed:
                raise RewardError("RewardPool.score: the pool is closed")
            self._batch += 1
            batch, errors, before = self._batch, {}, self.timeouts_total
            try:
                for w in list(self._workers):  # one that died since the last batch
                    if w.task is None and w.proc.poll() is not None:
                        self._replace(w)
                while todo or any(w.task is not None for w in self._workers):
                    if self._closed:
                        raise RewardError("RewardPool.score: the pool was closed while scoring")
                    if not errors:
                        self._dispatch(batch, todo)
                    else:  # the batch fails: collect what is in flight, send nothing more
                        todo.clear()
                    self._wait_and_handle(batch, out, errors)
            except BaseException:
                # interrupted (or closed) mid-batch: busy workers' answers would be stale
                for w in list(self._workers):
                    if w.task is not None and not self._closed:
                        w.task = None
                        self._replace(w)
                raise
            if errors:
                raise errors[min(errors)]
            return out, self.timeouts_total - before

    def _dispatch(self, batch: int, todo: collections.deque) -> None:
        for w in list(self._workers):
            if not todo:
                return
            if w.ready and w.task is None:
                i, response, answer, prompt = todo[0]
                try:
                    w.conn.send(("score", batch, i, response, answer, prompt))
                except OSError:  # died while idle: replace it, the answer waits
                    self._replace(w)
                    continue
                todo.popleft()
                w.task = (batch, i, time.monotonic() + self.timeout_s)

    def _wait_and_handle(self, batch, out, errors: dict) -> None:
        """Wait for the next message or deadline among busy and starting workers; handle
        results, errors, deaths and timeouts."""
        waiting = [w for w in self._workers if w.task is not None or not w.ready]
        if not waiting:
            return
        now = time.monotonic()
        deadline = min(w.task[2] if w.task is not None else w.start_deadline for w in waiting)
        for conn in wait([w.conn for w in waiting], timeout=max(0.0, deadline - now)):
            w = next(w for w in waiting if w.conn is conn)
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._died(w, batch, errors)
                continue
            self._handle(w, msg, batch, out, errors)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.task[2]:
                b, i, _ = w.task
                w.task = None
                if b == batch:
                    out[i] = 0.0
                    self.timeouts_total += 1
                    self.log(f"reward.fn={self.spec}: sample {i} was not scored within "
                             f"reward.timeout_s={self.timeout_s:g}s; it scores 0 (worker pid "
                             f"{w.proc.pid} killed and replaced)")
                self._replace(w)
            elif not w.ready and w.task is None and now >= w.start_deadline:
                raise RewardError(f"reward worker pid {w.proc.pid} did not start within "
                                  f"{START_TIMEOUT_S:g}s. Fix: check the machine's load, or "
                                  f"set reward.workers=0 to score in the trainer's process")

    def _handle(self, w: _Worker, msg: tuple, batch, out, errors: dict) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "spec":
            raise WorkerSpecError(msg[1])
        elif kind in ("ok", "error"):
            _, b, i, value = msg
            if w.task is None or w.task[:2] != (b, i):
                return  # the answer of a task already given up on
            w.task = None
            if b != batch:
                return
            if kind == "ok":
                out[i] = value
            else:
                errors[i] = RewardError(value)

    def _died(self, w: _Worker, batch, errors: dict) -> None:
        code = w.proc.wait()
        task, w.task = w.task, None
        what = (f"while scoring sample {task[1]}" if task is not None
                else "while starting" if not w.ready else "while idle")
        message = (f"reward worker pid {w.proc.pid} for reward.fn={self.spec} exited {what} "
                   f"(exit status {code}): the reward function crashed the process")
        if not w.ready:
            raise RewardError(f"{message}. Fix: run it by hand (python -c 'from srft_mcore"
                              f".reward import get_reward_fn; get_reward_fn({self.spec!r})'), "
                              f"or set reward.workers=0 to score in the trainer's process")
        if task is not None and task[0] == batch:
            errors[task[1]] = RewardError(message)
        self._replace(w)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Kill and reap the workers; idempotent. A batch being scored in another thread
        then fails with RewardError."""
        with self._spawn_lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pool(spec: Optional[str], workers: int, timeout_s: float,
              log: Optional[Callable[[str], None]] = None) -> Optional[RewardPool]:
    """The pool for ``reward.fn=spec``, or None to score in this process: ``workers=0``, or a
    spec only this process can resolve (said in ``log``)."""
    if workers <= 0:
        return None
    try:
        return RewardPool(spec, workers=workers, timeout_s=timeout_s, log=log)
    except WorkerSpecError as e:
        (log or _logger.warning)(
            f"reward.fn={spec}: a fresh worker process cannot resolve it ({e}); scoring in "
            f"this process, without reward.timeout_s. Fix: define the function in an "
            f"importable module and set reward.fn=module:function")
        return None


# --------------------------------------------------------------------------- the worker
def worker_main(argv: Sequence[str]) -> None:
    """A worker's loop: resolve the spec sent first, then score answers until EOF."""
    fd, parent = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    # the trainer's own rule for its ranks: die with the parent, by signal and by polling
    from srft_mcore.training.lifecycle import follow_parent

    follow_parent(parent, lambda _: os._exit(1), poll_s=1.0)
    conn = Connection(fd)
    try:
        init = conn.recv()
    except EOFError:
        return
    sys.path[:] = init["sys_path"]
    try:
        fn: RewardFn = get_reward_fn(init["spec"])
    except RewardError as e:
        conn.send(("spec", str(e)))
        return
    if fn is math_reward:  # import sympy / math-verify now, not on the first answer's clock
        math_reward("\\boxed{0.5}", "\\frac{1}{2}")
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        _, batch, i, response, answer, prompt = msg
        try:
            conn.send(("ok", batch, i, score_one(fn, i, response, answer, prompt)))
        except RewardError as e:
            conn.send(("error", batch, i, str(e)))
