"""Colocated servers on every node: two torchruns on this machine act as two nodes, each
launching its own colocated SGLang server and handing it the weights by handle (the
``tensor`` sync), and train exactly as the one-node reference run of tests/test_trainer.py
(TP2 on two ranks, the session's shared server, disk sync)."""
import os
import subprocess
import sys

import pytest

from test_trainer import CONFIG, SMALL, metrics, reference_run, stable  # noqa: F401 (fixture)

# memory requests are made only in colocated mode, and the reference's attached server is
# synced (version 0) before the first rollout, so its first samples carry a policy lag,
# where launched servers start from the weights on disk, untagged; the rest of every step's
# row must agree (test_trainer.stable drops what varies from run to run)
SKIP = ("rollout/memory_requests", "rollout/policy_lag")


def _node(run_dir, port, node_rank):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "SRFT_SYNC_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
           f"--node_rank={node_rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "srft_mcore.training.trainer", "--config", CONFIG,
           f"logging.run_dir={run_dir}", *SMALL, "train.steps=4", "rollout.num_servers=2",
           "rollout.weight_sync=tensor"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _rows(run_dir):
    return [{k: v for k, v in stable(r).items() if not k.startswith(SKIP)}
            for r in metrics(run_dir)]


@pytest.mark.slow
def test_two_nodes_with_their_own_colocated_servers_equal_one_node(tmp_path, reference_run):
    from srft_mcore.launching.distributed import free_port

    run_dir = tmp_path / "two_nodes"
    port = free_port()
    nodes = [_node(run_dir, port, k) for k in range(2)]
    outs = [n.communicate(timeout=900)[0] for n in nodes]
    for n, o in zip(nodes, outs):
        assert n.returncode == 0, o[-6000:]
    # each node launched its own server (TP2 spans both nodes: each server's handles come
    # from the rank on its own node), and the colocated sync reached both
    assert "node 0 (rank 0): colocated servers [0]" in outs[0]
    assert "node 1 (rank 1): colocated servers [1]" in outs[1]
    assert all(os.path.isfile(run_dir / "rollout" / f"sglang-{i}.log") for i in (0, 1))
    assert all(r["rollout/memory_requests"] > 0 for r in metrics(run_dir))
    two, one = _rows(run_dir), _rows(reference_run)
    assert len(two) == len(one) == 4
    assert two == one
