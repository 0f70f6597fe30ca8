"""TP / PP / DP layouts on real gloo ranks give the single-rank loss, gradients and update."""
import json
import subprocess
import sys

import pytest

from srft_mcore.doctor.parallel_check import check_layout

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

    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.doctor.parallel_check import run_rank

    ref = os.path.join(workdir, "reference_gb8_float32.pt")
    assert os.path.exists(ref)  # written by the tests above
    bad = spawn_ranks(run_rank, 2, (2, 1, 8, 1, 16, False, ref, None, None, 1234, True))
    assert bad[0]["max_grad_diff"] > 1e-3
    assert bad[0]["loss_diff"] > 1e-4


def test_doctor_parallel_tp2_pp2():
    out = subprocess.run([sys.executable, "-m", "srft_mcore.doctor.cli", "parallel", "--tp", "2",
                          "--pp", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["tp"] == 2 and res["pp"] == 2
    assert res["num_microbatches"] >= 4
    assert res["loss_diff"] <= 1e-6
    assert res["max_grad_diff"] <= 1e-5


def _doctor_json(*args):
    """``srft-doctor parallel ARGS`` through main() in this process (tests/cli_main.py): its
    ranks fork from the warm fork server; the command itself runs in the test above."""
    from cli_main import run_main
    from srft_mcore.doctor.cli import main

    rc, out, err = run_main(main, ["parallel", *args])
    assert rc == 0, out[-2000:] + err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_doctor_tied_embeddings_under_pp2_stay_one_weight():
    res = _doctor_json("--tp", "1", "--pp", "2", "--tied")
    assert res["ok"] and res["tied"] and res["tolerance"]["param"] == 1e-5
    assert res["tied_weight_diff"] <= 1e-5 and res["max_param_diff"] <= 1e-5, res


def test_tied_pp2_without_finalize_model_grads_diverges(workdir):
    """The check can fail: without finalize_model_grads the stages' copies of the tied
    weight each get only their own part of the gradient."""
    res = check_layout(1, 2, 1, workdir, tied=True, finalize_grads=False)
    assert not res["ok"]
    assert res["max_grad_diff"] > 1e-3 and res["tied_weight_diff"] > 1e-4, res


def test_doctor_bf16_tp2_within_its_stated_tolerance():
    res = _doctor_json("--tp", "2", "--dtype", "bfloat16")
    assert res["ok"] and res["dtype"] == "bfloat16"
    assert res["tolerance"] == {"loss": 2e-2, "grad": 5e-2, "param": 2e-2}
    assert 0 < res["loss_diff"] <= 2e-2 * res["reference_loss"]  # bf16 rounding, not fp32's
