"""TP / PP / DP layouts on real gloo ranks give the single-rank loss, gradients and update."""
import json
import subprocess
import sys

import pytest

from srft_mcore.parallel_check import check_layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # the single-rank reference is computed once and shared by every layout
    return str(tmp_path_factory.mktemp("parallel"))


@pytest.mark.parametrize("tp, pp, dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_layout_matches_single_rank(workdir, tp, pp, dp):
    res = check_layout(tp, pp, dp, workdir, global_batch=8, micro_batch=1)
    assert res["num_microbatches"] >= 4
    assert res["loss_diff"] <= 1e-6, res
    assert res["max_grad_diff"] <= 1e-5, res
    assert res["max_param_diff"] <= 1e-5, res


def test_dp2_distributed_optimizer_updates_like_one_rank(workdir):
    res = check_layout(1, 1, 2, workdir, distributed_optimizer=True, global_batch=8)
    assert res["update_ok"]
    assert res["loss_diff"] <= 1e-6, res
    assert res["max_param_diff"] <= 1e-5, res


def test_check_detects_a_wrong_layout(workdir):
    """The comparison can fail: TP2 with fc1 loaded as a plain chunk of [gate; up]."""
    import os

    from srft_mcore.launch import spawn_ranks
    from srft_mcore.parallel_check import run_rank

    ref = os.path.join(workdir, "reference_gb8.pt")
    assert os.path.exists(ref)  # written by the tests above
    bad = spawn_ranks(run_rank, 2, (2, 1, 8, 1, 16, False, ref, None, None, 1234, True))
    assert bad[0]["max_grad_diff"] > 1e-3
    assert bad[0]["loss_diff"] > 1e-4


def test_doctor_parallel_tp2_pp2():
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor", "parallel", "--tp", "2",
                          "--pp", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["tp"] == 2 and res["pp"] == 2
    assert res["num_microbatches"] >= 4
    assert res["loss_diff"] <= 1e-6
    assert res["max_grad_diff"] <= 1e-5
