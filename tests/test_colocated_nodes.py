"""Colocated servers on every node: two torchruns on this machine act as two nodes, each
launching its own colocated SGLang server and handing it the weights by handle (the
``tensor`` sync), and train exactly as one node whose two servers get the weights through
one shared broadcast group (the ``distributed`` sync)."""
import os
import subprocess
import sys

import pytest

from test_trainer import CONFIG, SMALL, metrics, stable

# memory requests are made only in colocated mode; the rest of every step's row must agree
# (test_trainer.stable drops what varies from run to run)
SKIP = ("rollout/memory_requests",)
RUN = ["train.steps=2", "parallel.tp=1", "rollout.num_servers=2", "train.prompts_per_step=4"]


def _torchrun(run_dir, launcher_args, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "SRFT_SYNC_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m",
           "srft_mcore.training.trainer", "--config", CONFIG, f"logging.run_dir={run_dir}",
           *SMALL, *RUN, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _rows(run_dir):
    return [{k: v for k, v in stable(r).items() if not k.startswith(SKIP)}
            for r in metrics(run_dir)]


@pytest.mark.slow
def test_two_nodes_with_their_own_colocated_servers_equal_one_node(tmp_path):
    from srft_mcore.launching.distributed import free_port

    one = tmp_path / "one_node"
    p = _torchrun(one, ["--standalone", "--nproc_per_node=2"], "rollout.weight_sync=distributed")
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-6000:]

    two = tmp_path / "two_nodes"
    port = free_port()
    nodes = [_torchrun(two, ["--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1",
                             "--master_addr=127.0.0.1", f"--master_port={port}"],
                       "rollout.weight_sync=tensor")
             for k in range(2)]
    outs = [n.communicate(timeout=900)[0] for n in nodes]
    for n, o in zip(nodes, outs):
        assert n.returncode == 0, o[-6000:]
    # each node launched its own server, and the colocated sync reached both
    assert "node 0 (rank 0): colocated servers [0]" in outs[0]
    assert "node 1 (rank 1): colocated servers [1]" in outs[1]
    assert all(os.path.isfile(two / "rollout" / f"sglang-{i}.log") for i in (0, 1))
    rows_one, rows_two = _rows(one), _rows(two)
    assert len(rows_two) == len(rows_one) == 2
    assert rows_two == rows_one
    assert all(r["rollout/memory_requests"] > 0 for r in metrics(two))
