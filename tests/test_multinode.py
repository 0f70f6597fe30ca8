"""Multi-node launching without a cluster: SLURM node lists (scontrol or the built-in parser),
which nodes train and which serve, and the dry runs of the scripts in examples/multinode/
(with fake SLURM variables; a fake srun records any call, and none may happen)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from srft_mcore.config import load_config
from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR
from srft_mcore.launching.multinode import (MultiNodeError, cluster_plan, expand_hostlist, plan_shell,
                                  slurm_nodes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI = os.path.join(ROOT, "examples", "multinode")
RECIPES = os.path.join(ROOT, "examples", "configs", "recipes")
SCRIPTS = ("srft_torchrun_multinode.sh", "sglang_node.sh", "srft_slurm.sbatch")


# --------------------------------------------------------------------------- node lists
@pytest.mark.parametrize("text,nodes", [
    ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
    ("a,b", ["a", "b"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("r[1-2]n[1-2],login", ["r1n1", "r1n2", "r2n1", "r2n2", "login"]),
    ("dgx[001-002],dgx100", ["dgx001", "dgx002", "dgx100"]),
])
def test_hostlist_expands_like_scontrol(text, nodes):
    assert expand_hostlist(text) == nodes


@pytest.mark.parametrize("text,match", [("gpu-[01-03", "without"), ("gpu-01]", "without"),
                                        ("x[3-1]", "cannot read"), ("x[a-b]", "cannot read"),
                                        (",", "names no node")])
def test_bad_hostlists_are_refused(text, match):
    with pytest.raises(MultiNodeError, match=match):
        expand_hostlist(text)


def _fake_bin(tmp_path, name: str, body: str) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path.parent)


def test_slurm_nodes_prefers_scontrol_and_falls_back_without_it(tmp_path, monkeypatch):
    env = {"SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_NNODES": "2"}
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, "scontrol", "echo from-scontrol-a\n"
                                         "echo from-scontrol-b"))
    assert slurm_nodes(env) == ["from-scontrol-a", "from-scontrol-b"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol: the parser
    assert slurm_nodes(env) == ["gpu-01", "gpu-02"]
    with pytest.raises(MultiNodeError, match="SLURM_NNODES=3"):
        slurm_nodes({**env, "SLURM_NNODES": "3"})
    with pytest.raises(MultiNodeError, match="not set"):
        slurm_nodes({})


# --------------------------------------------------------------------------- placement
def _recipe(name, *overrides):
    return load_config(os.path.join(RECIPES, f"{name}.yaml"), list(overrides))


# a 32B layout with dedicated rollout nodes
DEDICATED = ("parallel.tp=4", "parallel.pp=4", "parallel.dp=1", "rollout.num_servers=2",
             "rollout.server_tp=8", "rollout.weight_sync=distributed", "rollout.offload=none")
# a 7B layout on one node of 8 GPUs, two TP4 servers colocated
COLOCATED = ("parallel.tp=2", "parallel.pp=4", "parallel.dp=1", "rollout.num_servers=2",
             "rollout.server_tp=4", "rollout.weight_sync=tensor")


def test_trainer_takes_the_first_nodes_and_servers_the_next():
    plan = cluster_plan(_recipe("qwen2.5-32b", *DEDICATED), ["n1", "n2", "n3", "n4", "n5"], 8)
    # TP4 PP4 DP1 = 16 GPUs = 2 nodes; 2 servers x TP8 = 2 nodes; n5 is left idle
    assert plan["train_nodes"] == ["n1", "n2"] and plan["rollout_nodes"] == ["n3", "n4"]
    assert plan["server_urls"] == ["http://n3:30000", "http://n4:30000"]
    assert plan["nproc_per_node"] == 8 and plan["local_rollout_gpus"] == ""
    assert "TRAIN_NODES='n1 n2'" in plan_shell(plan)
    with pytest.raises(MultiNodeError, match="sbatch --nodes=4"):
        cluster_plan(_recipe("qwen2.5-32b", *DEDICATED), ["n1", "n2", "n3"], 8)
    two = cluster_plan(_recipe("qwen2.5-32b", *DEDICATED, "rollout.server_tp=4",
                               "rollout.num_servers=3"),
                       ["n1", "n2", "n3", "n4"], 8)
    assert two["rollout_nodes"] == ["n3", "n4"]  # 2 servers on n3, the third on n4
    assert two["server_urls"] == ["http://n3:30000", "http://n3:30001", "http://n4:30000"]


def test_one_node_runs_keep_their_servers_and_colocated_runs_on_every_node():
    coloc = cluster_plan(_recipe("qwen2.5-7b", *COLOCATED), ["n1"], 8)
    assert coloc["train_nodes"] == ["n1"] and coloc["rollout_nodes"] == []
    assert coloc["nproc_per_node"] == 8 and coloc["local_rollout_gpus"] == ""
    beside = cluster_plan(load_config(os.path.join(ROOT, "examples", "configs",
                                                   "srft_qwen7b_tp2pp1.yaml"),
                                      ["parallel.dp=3", "rollout.num_servers=1"]), ["n1"], 8)
    assert beside["nproc_per_node"] == 6 and beside["local_rollout_gpus"] == "6,7"
    # colocated on two nodes: each node launches its share of the servers itself
    two = cluster_plan(_recipe("qwen2.5-7b", *COLOCATED, "parallel.dp=2"),
                       ["n1", "n2"], 8)
    assert two["train_nodes"] == ["n1", "n2"] and two["rollout_nodes"] == []
    assert two["servers_per_node"] == 1 and two["server_urls"] == []
    with pytest.raises(MultiNodeError, match="multiple of 2"):
        cluster_plan(_recipe("qwen2.5-7b", *COLOCATED, "parallel.dp=2",
                             "rollout.num_servers=3"),
                     ["n1", "n2"], 8)
    by_url = cluster_plan(_recipe("qwen2.5-32b", *DEDICATED, 'rollout.urls=["http://s:1"]'),
                          ["n1", "n2"], 8)
    assert by_url["rollout_nodes"] == [] and by_url["server_urls"] == []


# --------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(MULTI, script)], check=True)


def _env(tmp_path, **extra) -> dict:
    """A clean environment: the venv's python, a fake srun/scontrol that leave a mark."""
    fake = _fake_bin(tmp_path, "srun", f"touch {tmp_path}/srun-called; exit 1")
    _fake_bin(tmp_path, "scontrol", "exit 1")  # present but failing: the parser takes over
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable,
           "DRY_RUN": "1", **extra}
    return env


def _run(args, env, ok=True):
    # from elsewhere than the repository: relative CONFIG paths resolve against it
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120,
                          cwd=env["HOME"])
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_torchrun_script_dry_run(tmp_path):
    env = _env(tmp_path, MASTER_ADDR="node0", MASTER_PORT="29555", NNODES="2",
               GPUS_PER_NODE="4", CONFIG="examples/configs/srft_tiny_cpu.yaml",
               SLURM_PROCID="1")
    out = _run(["bash", os.path.join(MULTI, "srft_torchrun_multinode.sh"), "train.steps=3"],
               env).stdout
    assert out.split() == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1",
        "--nproc_per_node=4", "--rdzv_backend=static", "--rdzv_endpoint=node0:29555",
        "-m", "srft_mcore.training", "--config",
        os.path.join(ROOT, "examples/configs/srft_tiny_cpu.yaml"), "train.steps=3"]
    bad = _run(["bash", os.path.join(MULTI, "srft_torchrun_multinode.sh")],
               {**env, "NODE_RANK": "2"}, ok=False)
    assert bad.returncode != 0 and "below NNODES=2" in bad.stderr
    bad = _run(["bash", os.path.join(MULTI, "srft_torchrun_multinode.sh")],
               {k: v for k, v in env.items() if k != "MASTER_ADDR"}, ok=False)
    assert bad.returncode != 0 and "MASTER_ADDR" in bad.stderr


def _slurm_env(tmp_path, **extra):
    job = dict(SLURM_JOB_NODELIST="gpu-[01-03,07]", SLURM_NNODES="4", SLURM_JOB_ID="77",
               SLURM_SUBMIT_DIR=ROOT, CONFIG="examples/configs/recipes/qwen2.5-32b.yaml",
               MODEL_DIR=EMBEDDED_MODEL_DIR, DATA_PATH="/data/train.parquet")
    return _env(tmp_path, **{**job, **extra})


def test_slurm_dry_run_starts_servers_first_then_torchrun_per_node(tmp_path):
    env = _slurm_env(tmp_path, ROUTER="node")
    out = _run(["bash", os.path.join(MULTI, "srft_slurm.sbatch"), "optimizer.lr=2e-6",
                *DEDICATED], env).stdout
    assert not (tmp_path / "srun-called").exists(), "a dry run launched something"
    lines = out.splitlines()
    assert "# trainer: gpu-01 gpu-02 (8 ranks each, master gpu-01:29500)" in lines
    steps = [ln for ln in lines if ln.startswith("srun ")]
    assert [s.split("--nodelist=")[1].split()[0] for s in steps] == [
        "gpu-03", "gpu-07", r"gpu-01\,gpu-02"]  # servers first, the trainer last
    assert all(s.endswith(" &") for s in steps[:2])
    # each rollout node: one TP8 server on its own address; the router on the first one
    servers = [ln for ln in lines if "sglang.launch_server" in ln]
    assert len(servers) == 2 and all("--tp-size 8" in s for s in servers)
    assert "--host gpu-03 --port 30000" in servers[0] and "--host gpu-07" in servers[1]
    router = [ln for ln in lines if "sglang_router.launch_router" in ln]
    assert len(router) == 1 and "--host gpu-03 --port 30100" in router[0]
    assert "--worker-urls http://gpu-03:30000 http://gpu-07:30000" in router[0]
    # the trainer gets the servers by URL and the router's URL; one torchrun line per node
    torchrun = [ln for ln in lines if "torch.distributed.run" in ln]
    assert len(torchrun) == 2
    for rank, line in enumerate(torchrun):
        assert f"--nnodes=2 --node_rank={rank} --nproc_per_node=8" in line
        assert "--rdzv_endpoint=gpu-01:29500" in line
        assert r'rollout.urls=\[\"http://gpu-03:30000\"\,\"http://gpu-07:30000\"\]' in line
        assert "rollout.router_url=http://gpu-03:30100" in line
        assert "rollout.sync_address=auto" in line and "optimizer.lr=2e-6" in line
    health = [ln for ln in lines if "srft_mcore.launching.multinode wait" in ln]
    assert len(health) == 1 and health[0].endswith("http://gpu-07:30000 http://gpu-03:30100")


def test_slurm_dry_run_router_on_the_trainer_and_refusals(tmp_path):
    out = _run(["bash", os.path.join(MULTI, "srft_slurm.sbatch"), *DEDICATED],
               _slurm_env(tmp_path, ROUTER="trainer")).stdout
    torchrun = [ln for ln in out.splitlines() if "torch.distributed.run" in ln]
    assert torchrun and all("rollout.router=true" in ln and "router_url" not in ln
                            for ln in torchrun)
    assert "sglang_router" not in out
    short = _run(["bash", os.path.join(MULTI, "srft_slurm.sbatch"), *DEDICATED],
                 _slurm_env(tmp_path, SLURM_JOB_NODELIST="gpu-[01-03]", SLURM_NNODES="3"),
                 ok=False)
    assert short.returncode == 2 and "sbatch --nodes=4" in short.stderr
    one = _run(["bash", os.path.join(MULTI, "srft_slurm.sbatch"), *COLOCATED],
               _slurm_env(tmp_path, SLURM_JOB_NODELIST="gpu-01", SLURM_NNODES="1",
                          CONFIG="examples/configs/recipes/qwen2.5-7b.yaml")).stdout
    # one node, colocated servers: no server steps, one torchrun of 8 ranks
    assert "sglang.launch_server" not in one
    assert [ln for ln in one.splitlines() if ln.startswith("srun ")] == [
        ln for ln in one.splitlines() if ln.startswith("srun --nodes=1 --ntasks=1 "
                                                       "--ntasks-per-node=1 --nodelist=gpu-01 ")]
    assert "--nnodes=1 --node_rank=0 --nproc_per_node=8" in one
    # two nodes, colocated: still no server steps, one torchrun per node, each of which
    # launches its node's servers
    two = _run(["bash", os.path.join(MULTI, "srft_slurm.sbatch"), *COLOCATED, "parallel.dp=2"],
               _slurm_env(tmp_path, SLURM_JOB_NODELIST="gpu-[01-02]", SLURM_NNODES="2",
                          CONFIG="examples/configs/recipes/qwen2.5-7b.yaml")).stdout
    assert "sglang.launch_server" not in two and "rollout.urls" not in two
    runs = [ln for ln in two.splitlines() if "torch.distributed.run" in ln]
    assert [f"--nnodes=2 --node_rank={k} --nproc_per_node=8" in ln
            for k, ln in enumerate(runs)] == [True, True]
    assert not (tmp_path / "srun-called").exists()


def test_sglang_node_dry_run_splits_the_gpus(tmp_path):
    env = _env(tmp_path, CONFIG="examples/configs/recipes/qwen2.5-32b.yaml",
               MODEL_DIR=EMBEDDED_MODEL_DIR, SERVERS_PER_NODE="2", SERVER_TP="4",
               SGLANG_HOST="10.0.0.3", SGLANG_PORT="31000")
    out = _run(["bash", os.path.join(MULTI, "sglang_node.sh")], env).stdout
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(r"env CUDA_VISIBLE_DEVICES=0\,1\,2\,3 ")
    assert lines[1].startswith(r"env CUDA_VISIBLE_DEVICES=4\,5\,6\,7 ")
    assert "--host 10.0.0.3 --port 31000" in lines[0] and "--port 31001" in lines[1]
    assert all("--tp-size 4" in ln and "--context-length" in ln and "--dtype bfloat16" in ln
               for ln in lines)
