"""Multi-node launch helpers behind ``examples/multinode/``: node lists, which nodes train and
which serve rollouts, and the flags of SGLang servers started outside the trainer.

    python -m srft_mcore.launching.multinode nodes                       # SLURM_JOB_NODELIST, one a line
    python -m srft_mcore.launching.multinode plan --config FILE --nodes n1 n2 n3 [--gpus-per-node 8]
        [--port 30000] [a.b=c ...]                             # shell assignments (eval them)
    python -m srft_mcore.launching.multinode server-args --config FILE model.hf_path=DIR [--shell]
        [a.b=c ...]                                            # SGLang flags of a run
    python -m srft_mcore.launching.multinode wait URL [URL ...] [--timeout 1800]

Placement (:func:`cluster_plan`): the trainer takes the first nodes, ``parallel.tp * pp * dp``
GPUs (``parallel.dp`` from the recipe, else every node not serving rollouts); SGLang servers
(``rollout.num_servers`` x ``rollout.server_tp`` GPUs) take the next whole nodes and are
reached by URL (``rollout.urls``). Colocated servers (``weight_sync=tensor``) are launched
by the trainer on every one of its nodes, an equal share each, on that node's GPUs. A run on
one node keeps dedicated servers there too, on the GPUs after the trainer's
(``SRFT_ROLLOUT_GPUS``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from srft_mcore.config import ConfigError, load_config


class MultiNodeError(ValueError):
    """A node list or placement that cannot work; the message says how to fix it."""


# --------------------------------------------------------------------------- node lists
def _split_top(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise MultiNodeError(f"node list {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise MultiNodeError(f"node list {text!r}: '[' without ']'")
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _expand_item(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            out.extend(_expand_item(head + part + tail, whole))
            continue
        r = re.fullmatch(r"(\d+)-(\d+)", part)
        if r is None or int(r.group(1)) > int(r.group(2)):
            raise MultiNodeError(f"node list {whole!r}: cannot read the range {part!r} "
                                 f"(expected N or N-M with N <= M)")
        width = len(r.group(1))  # zero padding as written: [08-10] -> 08 09 10
        for i in range(int(r.group(1)), int(r.group(2)) + 1):
            out.extend(_expand_item(f"{head}{i:0{width}d}{tail}", whole))
    return out


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu-[01-03,07],login1,r[1-2]n[1-2]`` ->
    ``gpu-01 gpu-02 gpu-03 gpu-07 login1 r1n1 r1n2 r2n1 r2n2`` (what ``scontrol show
    hostnames`` prints), in order."""
    nodes = [n for item in _split_top(text) for n in _expand_item(item, text)]
    if not nodes:
        raise MultiNodeError(f"node list {text!r} names no node")
    return nodes


def slurm_nodes(env: Optional[dict] = None, use_scontrol: bool = True) -> list[str]:
    """The job's nodes: ``scontrol show hostnames`` of SLURM_JOB_NODELIST when scontrol is
    on PATH, else :func:`expand_hostlist`; checked against SLURM_NNODES when it is set."""
    env = os.environ if env is None else env
    text = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not text:
        raise MultiNodeError("SLURM_JOB_NODELIST is not set. Fix: run inside a SLURM job "
                             "(sbatch/salloc), or pass the node names with --nodes")
    nodes = None
    if use_scontrol and shutil.which("scontrol"):
        try:
            done = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True,
                                  text=True, timeout=30, check=True)
            nodes = done.stdout.split() or None
        except (OSError, subprocess.SubprocessError):
            nodes = None
    nodes = nodes or expand_hostlist(text)
    count = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if count and int(count) != len(nodes):
        raise MultiNodeError(f"SLURM_JOB_NODELIST={text!r} names {len(nodes)} nodes but "
                             f"SLURM_NNODES={count}")
    return nodes


# --------------------------------------------------------------------------- placement
def cluster_plan(cfg, nodes: Sequence[str], gpus_per_node: int = 8, port: int = 30000,
                 scheme: str = "http") -> dict:
    """Which nodes train and which serve (see the module docstring). Returns
    ``train_nodes``, ``rollout_nodes``, ``nproc_per_node``, ``server_tp``,
    ``servers_per_node``, ``server_urls`` (servers on node ``k`` listen on ``port + i``) and
    ``local_rollout_gpus`` (SRFT_ROLLOUT_GPUS for servers beside a one-node trainer)."""
    p, r = cfg.parallel, cfg.rollout
    nodes = list(nodes)
    if gpus_per_node < 1:
        raise MultiNodeError(f"gpus_per_node={gpus_per_node} must be >= 1")
    mp = p.tp * p.pp
    colocated = r.weight_sync == "tensor"
    by_url = bool(r.urls)
    rollout_gpus = 0 if (colocated or by_url) else r.num_servers * r.server_tp
    if p.dp is not None:
        train_gpus = mp * p.dp
    elif len(nodes) <= 1:  # the GPUs the servers leave
        train_gpus = (gpus_per_node - rollout_gpus) // mp * mp
    else:  # every node that does not serve rollouts
        spare = len(nodes) - math.ceil(rollout_gpus / gpus_per_node)
        train_gpus = spare * gpus_per_node // mp * mp
    if train_gpus < 1:
        raise MultiNodeError(f"parallel.tp * parallel.pp = {mp} does not fit "
                             f"{gpus_per_node} GPUs per node")
    base = dict(server_tp=r.server_tp, servers_per_node=0, server_urls=[],
                local_rollout_gpus="")
    if train_gpus + rollout_gpus <= gpus_per_node:  # one node: the trainer starts its servers
        if not nodes:
            raise MultiNodeError("no nodes given")
        local = ",".join(str(g) for g in range(train_gpus, train_gpus + rollout_gpus))
        return dict(base, train_nodes=nodes[:1], rollout_nodes=[], nproc_per_node=train_gpus,
                    local_rollout_gpus=local)
    if train_gpus % gpus_per_node:
        raise MultiNodeError(
            f"the trainer needs tp*pp*dp = {p.tp}*{p.pp}*{p.dp} = {train_gpus} GPUs: more than "
            f"one node of {gpus_per_node}, but not whole nodes. Fix: choose parallel.dp so that "
            f"tp*pp*dp is a multiple of {gpus_per_node}")
    train_nodes = train_gpus // gpus_per_node
    if colocated:  # every training node launches its share of the servers on its own GPUs
        share, rest = divmod(r.num_servers, train_nodes)
        if rest or share * r.server_tp > gpus_per_node:
            raise MultiNodeError(
                f"colocated servers (rollout.weight_sync=tensor) run on every node of the "
                f"trainer, an equal share each: {r.num_servers} servers x TP{r.server_tp} do "
                f"not split into {train_nodes} nodes of {gpus_per_node} GPUs. Fix: "
                f"rollout.num_servers a multiple of {train_nodes} with "
                f"num_servers / {train_nodes} x server_tp <= {gpus_per_node}")
        if len(nodes) < train_nodes:
            raise MultiNodeError(f"{len(nodes)} nodes given; the trainer needs {train_nodes}. "
                                 f"Fix: allocate {train_nodes} nodes (sbatch "
                                 f"--nodes={train_nodes})")
        return dict(base, train_nodes=nodes[:train_nodes], rollout_nodes=[],
                    nproc_per_node=gpus_per_node, servers_per_node=share)
    if r.server_tp > gpus_per_node:
        raise MultiNodeError(f"rollout.server_tp={r.server_tp} is more than a node's "
                             f"{gpus_per_node} GPUs")
    per_node = gpus_per_node // r.server_tp
    serve_nodes = 0 if by_url else math.ceil(r.num_servers / per_node)
    if train_nodes + serve_nodes > len(nodes):
        raise MultiNodeError(
            f"{len(nodes)} node{'' if len(nodes) == 1 else 's'} given; the trainer needs "
            f"{train_nodes} (tp*pp*dp = "
            f"{train_gpus} GPUs) and the {r.num_servers} rollout servers x TP{r.server_tp} "
            f"need {serve_nodes} more. Fix: allocate {train_nodes + serve_nodes} nodes "
            f"(sbatch --nodes={train_nodes + serve_nodes})")
    rollout_nodes = nodes[train_nodes:train_nodes + serve_nodes]
    urls = []
    for k, node in enumerate(rollout_nodes):
        count = min(per_node, r.num_servers - k * per_node)
        urls += [f"{scheme}://{node}:{port + i}" for i in range(count)]
    return dict(base, train_nodes=nodes[:train_nodes], rollout_nodes=rollout_nodes,
                nproc_per_node=gpus_per_node, servers_per_node=per_node, server_urls=urls)


def plan_shell(plan: dict) -> str:
    """The plan as ``NAME=value`` lines for a shell's ``eval``."""
    out = {"TRAIN_NODES": " ".join(plan["train_nodes"]),
           "ROLLOUT_NODES": " ".join(plan["rollout_nodes"]),
           "NPROC_PER_NODE": plan["nproc_per_node"], "SERVER_TP": plan["server_tp"],
           "SERVERS_PER_NODE": plan["servers_per_node"],
           "SERVER_URLS": " ".join(plan["server_urls"]),
           "LOCAL_ROLLOUT_GPUS": plan["local_rollout_gpus"]}
    return "\n".join(f"{k}={shlex.quote(str(v))}" for k, v in out.items())


def server_args(cfg, hf_config: dict, device: str = "cuda") -> list[str]:
    """Flags of an SGLang server the trainer does not launch: the same ones it gives the
    servers it launches (device defaults with ``--tp-size``, the run's context length and
    RoPE overrides, the trainer's dtype), without ``--model-path/--host/--port``."""
    from srft_mcore.rollout.server import context_server_args, default_args

    return [*default_args(cfg.rollout.server_tp, device),
            *context_server_args(cfg, hf_config), "--dtype", cfg.model.dtype]


def wait_healthy(urls: Sequence[str], timeout_s: float = 1800.0, poll_s: float = 5.0,
                 say=print) -> None:
    """Poll each URL's /health until 200; :class:`MultiNodeError` naming the silent ones."""
    import requests

    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    while waiting:
        for url in list(waiting):
            try:
                if requests.get(url.rstrip("/") + "/health", timeout=5).status_code == 200:
                    waiting.remove(url)
                    say(f"[multinode] {url} is up")
            except requests.RequestException:
                pass
        if waiting and time.monotonic() > deadline:
            raise MultiNodeError(f"not healthy within {timeout_s:.0f}s: {' '.join(waiting)} "
                                 f"(see the servers' logs)")
        if waiting:
            time.sleep(poll_s)


# --------------------------------------------------------------------------- CLI
def _config(args):
    return load_config(args.config, args.overrides)


def _hf_config(cfg) -> dict:
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    path = cfg.model.hf_path or EMBEDDED_MODEL_DIR
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MultiNodeError(f"model.hf_path={path!r} has no config.json. Fix: set "
                             f"model.hf_path (MODEL_DIR) to the Hugging Face model directory")
    return load_hf_config(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m srft_mcore.launching.multinode",
                                 description="Helpers of the multi-node launch scripts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("nodes", help="the SLURM job's nodes, one a line")
    plan = sub.add_parser("plan", help="trainer and rollout nodes as shell assignments")
    plan.add_argument("--config", required=True)
    plan.add_argument("--nodes", nargs="+", help="node names (default: the SLURM job's)")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--port", type=int, default=30000, help="first SGLang port per node")
    plan.add_argument("overrides", nargs="*")
    sa = sub.add_parser("server-args", help="flags for SGLang servers started by a script")
    sa.add_argument("--config", required=True)
    sa.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    sa.add_argument("--shell", action="store_true",
                    help="print SERVER_TP=... and SERVER_ARGS=(...) for a shell's eval")
    sa.add_argument("overrides", nargs="*")
    wait = sub.add_parser("wait", help="wait until every URL answers /health")
    wait.add_argument("urls", nargs="+")
    wait.add_argument("--timeout", type=float, default=1800.0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "nodes":
            print("\n".join(slurm_nodes()))
        elif args.cmd == "plan":
            nodes = args.nodes or slurm_nodes()
            print(plan_shell(cluster_plan(_config(args), nodes, args.gpus_per_node, args.port)))
        elif args.cmd == "server-args":
            cfg = _config(args)
            flags = shlex.join(server_args(cfg, _hf_config(cfg), args.device))
            print(f"SERVER_TP={cfg.rollout.server_tp}\nSERVER_ARGS=({flags})" if args.shell
                  else flags)
        elif args.cmd == "wait":
            wait_healthy(args.urls, args.timeout, say=lambda m: print(m, file=sys.stderr))
    except (MultiNodeError, ConfigError, ValueError) as e:
        print(f"multinode: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
