"""SGLang server processes: launch on a free loopback port, wait for health, stop cleanly.

Usage::

    from srft_mcore.rollout.server import SGLangServer

    server = SGLangServer.launch(model_dir)            # starts and waits for /health
    print(server.url, server.pid)                      # http://127.0.0.1:<port>, launcher PID
    ...
    server.stop()                                      # SIGTERM to the process group, then SIGKILL

    remote = SGLangServer.attach("http://10.0.0.5:30000")   # a server someone else runs

``launch`` raises :class:`ServerStartError` when the server exits or is not healthy within
``startup_timeout_s``; the message carries the tail of the server log. Each server runs in its
own session (process group), so ``stop`` also reaches the scheduler and detokenizer children.
Every launched server is stopped at interpreter exit, on SIGTERM/SIGHUP (turned into
``SystemExit`` so ``finally`` blocks and atexit run) and on Ctrl-C (``KeyboardInterrupt``
unwinds to atexit). When launched from the main thread, the launcher also gets
``PR_SET_PDEATHSIG`` (SIGKILL) so it dies with a trainer that is killed; SGLang's own children follow it.

Without CUDA the CPU recipe is used (``--device cpu`` with the torch-native backends, fp32,
a small KV pool); with CUDA the GPU defaults plus ``--tp-size``. :func:`context_server_args`
gives the flags (``--context-length``, RoPE / context overrides) that make a server take the
run's prompt + response lengths with the same positions as the trainer's model.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence, TypeVar

import requests

from srft_mcore.config import sglang_mem_fraction
from srft_mcore.launching.distributed import free_port

CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--disable-overlap-schedule", "--grammar-backend", "none",
    "--sleep-on-idle", "--dtype", "float32", "--mem-fraction-static", "0.05",
    "--max-total-tokens", "4096",
)
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


TORCHRUN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                "MASTER_PORT"}


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message holds its log tail."""


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def default_args(tp: int = 1, device: Optional[str] = None,
                 mem_fraction: Optional[float] = None) -> list[str]:
    """Flags for this machine: the CPU recipe without CUDA, else GPU defaults with
    ``--tp-size`` and ``--mem-fraction-static`` (default: a dedicated GPU's, see
    :data:`srft_mcore.config.SGLANG_MEM_FRACTION`)."""
    device = device or ("cuda" if cuda_available() else "cpu")
    # custom logit processors carry the seeded (reproducible) sampling of rollout/seeded.py
    common = ["--enable-custom-logit-processor"]
    if device == "cpu":
        if tp != 1:
            raise ValueError(f"SGLang on CPU runs with tp=1, got tp={tp}")
        return list(CPU_ARGS) + common
    fraction = sglang_mem_fraction(mem_fraction, colocated=False)
    return ["--tp-size", str(tp), "--mem-fraction-static", f"{fraction:g}"] + common


SGLANG_CONTEXT_MARGIN = 2
"""Tokens SGLang's scheduler keeps free below ``--context-length`` in every request."""


def transformers_major() -> int:
    """Major version of transformers here, which is also the server's: servers run under
    this interpreter (``sys.executable -m sglang.launch_server``)."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def model_override_args(hf_config: dict, rope_theta: Optional[float] = None,
                        max_position_embeddings: Optional[int] = None,
                        hf_major: Optional[int] = None) -> dict:
    """The ``--json-model-override-args`` dict that gives SGLang the trainer's RoPE base and
    context length; empty when neither is overridden.

    SGLang sets each key on the HF config it loaded. transformers 5 keeps the base in
    ``rope_parameters`` (which SGLang reads first), 4.x at the top level; for 5.x the whole
    ``rope_parameters`` dict is given, so a SGLang that replaces it and one that merges it
    end with the same values."""
    out: dict = {}
    if rope_theta is not None:
        out["rope_theta"] = float(rope_theta)
        if (transformers_major() if hf_major is None else hf_major) >= 5:
            params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
            params.setdefault("rope_type", params.pop("type", "default"))
            out["rope_parameters"] = {**params, "rope_theta": float(rope_theta)}
    if max_position_embeddings is not None:
        out["max_position_embeddings"] = int(max_position_embeddings)
    return out


def context_server_args(cfg, hf_config: dict, hf_major: Optional[int] = None) -> list[str]:
    """Flags that make a server agree with the trainer on lengths and positions (``cfg``: the
    run's Config): ``--context-length`` for data.max_prompt_len + data.max_response_len
    (SGLang refuses longer requests), and model.rope_theta / model.max_position_embeddings
    through ``--json-model-override-args`` (the trainer's GPTModel gets the same values,
    config/hf_config.py:with_overrides). ``config.validate`` has checked that the lengths fit."""
    from srft_mcore.config.hf_config import context_limit, with_overrides

    m, d = cfg.model, cfg.data
    # SGLang generates at most context_length - prompt - 2 tokens (its scheduler keeps a
    # request below context_length - 1), and refuses a context_length above the model's
    length = d.max_prompt_len + d.max_response_len + SGLANG_CONTEXT_MARGIN
    limit = context_limit(with_overrides(hf_config, m))
    args = ["--context-length", str(length if limit is None else min(length, limit))]
    overrides = model_override_args(hf_config, m.rope_theta, m.max_position_embeddings,
                                    hf_major)
    if overrides:
        args += ["--json-model-override-args", json.dumps(overrides, sort_keys=True)]
    return args


def _set_pdeathsig() -> None:
    """Child side of Popen: die when the launching thread dies (Linux only). SIGKILL: on
    SIGTERM the launcher waits for its in-flight requests, which a stuck weight-update
    request never finishes; SGLang's scheduler and detokenizer follow their parent."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Optional[str], n_lines: int = 40) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n_lines:])


_P = TypeVar("_P", bound="ManagedProcess")


class ManagedProcess:
    """A child HTTP process we own, or a URL we attach to.

    Holds what :class:`SGLangServer` and the router share: the spawn (own process group,
    output to ``log_path``, death signal, stopped at exit), /health polling, stop and restart.
    Subclasses give :meth:`command`, :meth:`start` and the names in their messages."""

    kind = "process"           # "<kind> already running"
    log_prefix = "process"     # temporary log file: <log_prefix>_<port>_*.log
    start_error = ServerStartError

    def __init__(self, port: Optional[int] = None, host: str = "127.0.0.1",
                 log_path: Optional[str] = None, startup_timeout_s: float = 300.0,
                 url: Optional[str] = None):
        self.host = host
        self.port = port
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self._url = url.rstrip("/") if url else None
        self._log_file = None

    @classmethod
    def attach(cls: "type[_P]", url: str) -> _P:
        """Wrap a process started elsewhere; ``stop``/``restart`` do not touch it."""
        return cls(url=url)

    # ------------------------------------------------------------------ properties
    @property
    def owned(self) -> bool:
        return self._url is None or self.proc is not None

    @property
    def url(self) -> str:
        if self._url is not None and self.proc is None:
            return self._url
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def is_alive(self) -> bool:
        """Own process still running (an attached one: /health answers)."""
        if self.proc is not None:
            return self.proc.poll() is None
        if self._url is not None:
            return self.healthy(timeout_s=5.0)
        return False

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def ready(self, timeout_s: float = 5.0) -> bool:
        """Ready to take requests (what :meth:`wait_healthy` waits for): /health answers."""
        return self.healthy(timeout_s)

    def log_tail(self, n_lines: int = 40) -> str:
        return _tail(self.log_path, n_lines)

    # ------------------------------------------------------------------ subclass hooks
    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self: _P) -> _P:
        """Spawn the process (returns at once; see :meth:`wait_healthy`): the subclass's
        checks, then :meth:`_spawn`."""
        raise NotImplementedError

    def _launchable(self) -> bool:
        """Whether ``restart`` may start this object again (beyond being ``owned``)."""
        return True

    def _name(self, with_url: bool) -> str:
        """How the error messages name the process."""
        return f"{self.kind} at {self.url}" if with_url else self.kind

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self: _P, env: Optional[dict] = None) -> _P:
        """Start :meth:`command` with output to the log, in its own process group."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.kind} already running (pid {self.proc.pid})")
        if self.port is None:
            self.port = free_port()
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"{self.log_prefix}_{self.port}_",
                                                 suffix=".log")
            os.close(fd)
        cmd = self.command()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        in_main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, close_fds=True,
            preexec_fn=_set_pdeathsig if in_main else None)
        _register(self)
        return self

    def wait_healthy(self: _P, timeout_s: Optional[float] = None) -> _P:
        """Poll :meth:`ready` until it holds; raise ``start_error`` with the log tail
        otherwise."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise self.start_error(
                    f"{self._name(with_url=False)} exited with code {code} during start-up. "
                    f"Log {self.log_path} (tail):\n{self.log_tail()}")
            if self.ready(timeout_s=2.0):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise self.start_error(
                    f"{self._name(with_url=True)} was not healthy within {timeout_s:.0f}s. "
                    f"Log {self.log_path} (tail):\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _kill_group(proc, timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _unregister(self)

    def restart(self: _P, timeout_s: Optional[float] = None) -> _P:
        """Stop (if needed) and start again on the same port; counts in ``restarts``."""
        if not self.owned or not self._launchable():
            raise RuntimeError(f"cannot restart {self.url}: it was attached, not launched here")
        self.stop()
        self.restarts += 1
        self.start()
        return self.wait_healthy(timeout_s)

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class SGLangServer(ManagedProcess):
    """One SGLang HTTP server: a child process we own, or a URL we attach to."""

    kind = "server"
    log_prefix = "sglang"

    def __init__(self, model_path: Optional[str] = None, port: Optional[int] = None,
                 host: str = "127.0.0.1", tp: int = 1, extra_args: Sequence[str] = (),
                 env: Optional[dict] = None, log_path: Optional[str] = None,
                 startup_timeout_s: float = 300.0, device: Optional[str] = None,
                 url: Optional[str] = None, mem_fraction: Optional[float] = None):
        super().__init__(port=port, host=host, log_path=log_path,
                         startup_timeout_s=startup_timeout_s, url=url)
        self.model_path = model_path
        self.tp = tp
        self.mem_fraction = mem_fraction
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.device = device or ("cuda" if cuda_available() else "cpu")

    @classmethod
    def launch(cls, model_path: str, port: Optional[int] = None, **kwargs) -> "SGLangServer":
        """Start a server for ``model_path`` and wait until it is healthy."""
        server = cls(model_path, port=port, **kwargs)
        server.start()
        server.wait_healthy()
        return server

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", self.host, "--port", str(self.port),
                *default_args(self.tp, self.device, self.mem_fraction), *self.extra_args]

    def start(self) -> "SGLangServer":
        """Spawn the server process (returns at once; see :meth:`wait_healthy`)."""
        if self.model_path is None:
            raise ValueError("an attached server cannot be started; launch one with a model_path")
        # a trainer launched by torchrun must not hand its rendezvous variables to SGLang,
        # whose own process group would otherwise wait for the trainer's world size
        env = {k: v for k, v in os.environ.items()
               if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
        env.update({**(CPU_ENV if self.device == "cpu" else {}), **self.env})
        return self._spawn(env)

    def _launchable(self) -> bool:
        return self.model_path is not None

    def _name(self, with_url: bool) -> str:
        if with_url:
            return f"SGLang server at {self.url} ({self.model_path!r})"
        return f"SGLang server for {self.model_path!r}"

    def __repr__(self) -> str:
        return f"SGLangServer(url={self.url!r}, pid={self.pid}, model={self.model_path!r})"


def _kill_group(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    # the group id equals the launcher's PID (start_new_session); the children keep it even
    # after the launcher has exited, so signal the group whether or not the launcher lives
    pgid = pgid if pgid is not None else proc.pid
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
            if sig == signal.SIGTERM:  # a stopped (hung by SIGSTOP) process acts on it only now
                os.killpg(pgid, signal.SIGCONT)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---------------------------------------------------------------------- cleanup registry
_LIVE: "set[ManagedProcess]" = set()
_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def stop_all() -> None:
    """Stop every server and router launched here (atexit and signal handlers call it)."""
    with _LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop(timeout_s=10.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum, frame):
    stop_all()
    raise SystemExit(128 + signum)


def _register(server: ManagedProcess) -> None:
    global _HOOKS_INSTALLED
    with _LOCK:
        _LIVE.add(server)
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def _unregister(server: ManagedProcess) -> None:
    with _LOCK:
        _LIVE.discard(server)
