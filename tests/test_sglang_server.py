"""The SGLang CPU server from the setup script starts, serves /generate and stops cleanly."""
import json
import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slow


def sglang_processes():
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("sglang" in cmd and "launch_server" in cmd) or cmd.startswith("sglang::"):
            found.append(p.info["pid"])
    return set(found)


def test_doctor_sglang_generates_and_leaves_no_orphans():
    before = sglang_processes()
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor.cli", "sglang", "--timeout", "300"],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["n_samples"] == 2 and res["stopped"]
    assert all(n > 0 for n in res["tokens"])
    assert res["logprobs_finite"]
    # no SGLang scheduler/detokenizer/launcher process of ours survives
    leftover = sglang_processes() - before
    alive = [pid for pid in leftover if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"SGLang processes left running: {alive}"
