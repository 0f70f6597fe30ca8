"""The SGLang CPU server from the setup script starts, serves /generate and stops cleanly."""
import json
import os
import subprocess
import sys
import uuid

import psutil
import pytest

pytestmark = pytest.mark.slow


def processes_tagged(tag: str) -> list:
    """Live processes whose environment carries ``tag``: what one command started, and
    nothing of the other tests that run at the same time (their servers too)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("SRFT_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_doctor_sglang_generates_and_leaves_no_orphans():
    tag = uuid.uuid4().hex  # inherited by the server and its scheduler and detokenizer
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor.cli", "sglang", "--timeout",
                          "300"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", SRFT_TEST_TAG=tag))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["n_samples"] == 2 and res["stopped"]
    assert all(n > 0 for n in res["tokens"])
    assert res["logprobs_finite"]
    # no SGLang scheduler/detokenizer/launcher process of ours survives
    alive = processes_tagged(tag)
    assert not alive, f"SGLang processes left running: {alive}"
