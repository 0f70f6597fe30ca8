"""A trainer ends with its launcher, and a run directory takes one trainer at a time.

The end-to-end tests start the real trainer (torchrun, gloo, a real SGLang CPU server) and
SIGKILL the launcher the way ``kill -9`` on the demo script would, or start a second trainer
on a directory whose first trainer is still running."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from srft_mcore.config import ConfigError
from srft_mcore.training.lifecycle import LOCK_NAME, RunDirLocked, lock_run_dir, watch_launcher
from test_trainer import CONFIG, SMALL, single_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


# --------------------------------------------------------------------------- helpers
def alive(procs):
    """The processes of ``procs`` still running (a zombie has stopped running)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs, timeout_s):
    deadline = time.monotonic() + timeout_s
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(procs)


def describe(procs):
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


def kill_all(procs):
    for p in alive(procs):
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.Error:
            pass


def tree(pid):
    """``pid`` and all its descendants, whatever session they are in."""
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def is_rank(p):
    return "srft_mcore.training.trainer" in " ".join(p.cmdline())


def is_sglang(p):
    cmd = " ".join(p.cmdline())
    return "sglang.launch_server" in cmd or cmd.startswith("sglang::")


def metric_rows(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def wait_training(proc, run_dir, log_path, timeout_s=900):
    """Block until the run has logged a step (so its SGLang server is up)."""
    deadline = time.monotonic() + timeout_s
    while metric_rows(run_dir) < 1:
        assert proc.poll() is None, open(log_path).read()[-6000:]
        assert time.monotonic() < deadline, "no training step within the time limit"
        time.sleep(0.5)


def start_trainer(run_dir, log_path, *overrides, torchrun=True):
    """A long run (it is stopped by the test), output to ``log_path``."""
    args = ["-m", "srft_mcore.training.trainer", "--config", CONFIG, f"logging.run_dir={run_dir}",
            *SMALL, "train.steps=500", "checkpoint.every=1000", *overrides]
    if torchrun:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    else:
        args += ["parallel.tp=1"]
    env = {k: v for k, v in ENV.items()
           if torchrun or k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                    "MASTER_PORT")}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def snapshot(directory):
    """Every file under ``directory``: its size, mtime and content hash."""
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
    return out


# --------------------------------------------------------------------------- the lock, in-process
def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    run_dir = str(tmp_path / "run")
    lock = lock_run_dir(run_dir)  # creates the directory
    lock_file = os.path.join(run_dir, LOCK_NAME)
    holder = json.loads(open(lock_file).read())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    before = open(lock_file).read()
    # flock belongs to the open file, so a second open in this process is refused as well
    with pytest.raises(RunDirLocked) as err:
        lock_run_dir(run_dir)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)  # reported as an input error, exit 2
    assert repr(os.path.abspath(run_dir)) in msg
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
    assert "Fix:" in msg and "another logging.run_dir" in msg
    assert open(lock_file).read() == before  # the refused call wrote nothing
    lock.release()
    with lock_run_dir(run_dir) as again:
        assert again.held


def test_stale_lock_file_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text('{"pid": 999999999, "host": "gone", "started": "x"}\n')
    with lock_run_dir(str(run_dir)) as lock:
        assert lock.held
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_run_dir_that_is_a_file_is_an_input_error(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file"):
        lock_run_dir(str(path))
    assert path.read_text() == "not a directory"


def test_watch_is_not_armed_outside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert watch_launcher() is False


# --------------------------------------------------------------------------- multi-process
HOLDER = """
import sys, time
from srft_mcore.training.lifecycle import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_lock_held_by_another_process_until_it_dies(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on host"):
            lock_run_dir(run_dir)
        holder.kill()  # dies without releasing: the kernel drops the lock
        holder.wait(10)
        with lock_run_dir(run_dir) as lock:
            assert lock.held
    finally:
        holder.kill()
        holder.wait(10)


# a rank that has saved: Megatron's checkpoint writer has its results-queue Manager process
WRITER_RANK = """
import os, threading, time
from srft_mcore.training import checkpoint
from megatron.core.dist_checkpointing.strategies import filesystem_async

def start():
    checkpoint._writer_queue_ends_with_this_process()
    filesystem_async._results_queue.put("ok")  # the queue Megatron's writer will use works
    assert filesystem_async._results_queue.get() == "ok"

t = threading.Thread(target=start) if os.environ.get("OFF_MAIN") else None
t.start() if t else start()
t.join() if t else None
print(checkpoint._writer_manager._process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("thread", ["main", "other"])
def test_checkpoint_writer_queue_process_ends_with_a_killed_rank(thread):
    """kill -9 on a rank leaves no Megatron writer-queue Manager behind (it used to stay,
    re-parented to init): started from the main thread (death signal) or another (polling)."""
    env = dict(ENV, **({"OFF_MAIN": "1"} if thread == "other" else {}))
    rank = subprocess.Popen([sys.executable, "-c", WRITER_RANK], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    manager = None
    try:
        manager = psutil.Process(int(rank.stdout.readline()))
        assert manager.ppid() == rank.pid and manager.is_running()
        rank.kill()
        rank.wait(10)
        assert not wait_gone([manager], 15), describe([manager])
    finally:
        rank.kill()
        kill_all([manager] if manager else [])


# the "rank": arms the watch, starts a stand-in server (a sleeping child registered like a
# SGLang server) and reports both pids; it never exits by itself
FAKE_RANK = """
import os, sys, threading, time
from srft_mcore.training.lifecycle import watch_launcher
from srft_mcore.rollout.server import SGLangServer

class Sleeper(SGLangServer):
    def command(self):
        return [sys.executable, "-c", "import time; time.sleep(600)"]

mode = sys.argv[1]
watch_launcher(force=True, death_signal=mode == "death_signal")
server = Sleeper("unused", port=1, log_path=os.devnull)
if mode == "watcher":  # started off the main thread, the stand-in has no death signal of its own
    t = threading.Thread(target=server.start)
    t.start()
    t.join()
else:
    server.start()
print(os.getpid(), server.pid, flush=True)
time.sleep(600)
"""
# the "launcher": starts the rank in its own session, as torchrun does
FAKE_LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["death_signal", "watcher"])
def test_rank_and_its_server_end_with_the_launcher(mode):
    launcher = subprocess.Popen([sys.executable, "-c", FAKE_LAUNCHER, FAKE_RANK, mode],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        rank_pid, server_pid = map(int, launcher.stdout.readline().split())
        procs = [psutil.Process(rank_pid), psutil.Process(server_pid)]
        assert os.getsid(rank_pid) != os.getsid(launcher.pid)  # out of reach of killpg
        launcher.kill()
        launcher.wait(10)
        left = wait_gone(procs, 15)
        assert not left, describe(left)
    finally:
        launcher.kill()
        kill_all(procs)


@pytest.mark.slow
def test_sigkill_on_the_launcher_stops_every_rank_and_server(tmp_path):
    """kill -9 on torchrun's process group: both ranks (in their own sessions) and rank 0's
    SGLang server (scheduler and detokenizer included) must not train on."""
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "torchrun.log")
    torchrun = start_trainer(run_dir, log)
    procs = []
    try:
        wait_training(torchrun, run_dir, log)
        procs = tree(torchrun.pid)[1:]  # collected before the kill: afterwards they are orphans
        ranks, servers = [p for p in procs if is_rank(p)], [p for p in procs if is_sglang(p)]
        assert len(ranks) == 2, describe(procs)
        assert servers, describe(procs)
        assert all(os.getsid(p.pid) != os.getsid(torchrun.pid) for p in ranks)
        os.killpg(torchrun.pid, signal.SIGKILL)
        torchrun.wait(30)
        left = wait_gone(procs, 60)
        assert not left, (describe(left), open(log).read()[-3000:])
        # the run directory is free again: a --resume would be the only trainer in it
        with lock_run_dir(run_dir) as lock:
            assert lock.held
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
        kill_all(procs)


@pytest.mark.slow
def test_second_trainer_on_a_locked_run_dir_is_refused(tmp_path, sglang_url):
    from test_trainer import attached

    run_dir, log = str(tmp_path / "run"), str(tmp_path / "first.log")
    first = start_trainer(run_dir, log, *attached(sglang_url), torchrun=False)
    procs = []
    try:
        wait_training(first, run_dir, log)
        procs = tree(first.pid)
        for p in procs:  # frozen, so its files stay as they are while the others try
            p.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        want = [repr(os.path.abspath(run_dir)), f"pid {first.pid} on host {socket.gethostname()}",
                "Fix:"]

        fresh = single_rank(f"logging.run_dir={run_dir}")  # a fresh run, no torchrun
        assert fresh.returncode == 2, fresh.stderr[-3000:]
        assert "is in use by another trainer" in fresh.stderr, fresh.stderr[-3000:]
        assert all(w in fresh.stderr for w in want), fresh.stderr[-3000:]
        assert "Traceback" not in fresh.stderr

        # --resume under torchrun: rank 0 is refused, torchrun stops rank 1 (no hang)
        resumed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "srft_mcore.training.trainer", "--config", CONFIG,
             f"logging.run_dir={run_dir}", *SMALL, "--resume"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert resumed.returncode != 0
        assert all(w in resumed.stderr for w in want), resumed.stderr[-3000:]

        assert snapshot(run_dir) == before  # nothing of the first run was touched
        assert all(p.status() == psutil.STATUS_STOPPED for p in alive(procs))
    finally:
        kill_all(procs)
