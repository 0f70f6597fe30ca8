"""sglang-router in front of the rollout servers: config checks, the weight-sync address,
the engine's routing (/generate through the router, weight sync and control to every server)
against fake servers, and one slow test with two real SGLang CPU servers behind a launched
router."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch

from fake_http import JsonHandler
from srft_mcore.config import ConfigError, load_config, validate
from srft_mcore.rollout.engine import RolloutEngine
from srft_mcore.rollout.errors import RolloutError
from srft_mcore.rollout.router import SGLangRouter
from srft_mcore.rollout.server import SGLangServer
from srft_mcore.rollout.sync_address import resolve_sync_address

URLS = '["http://node3:30000","http://node4:30000"]'


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides,match", [
    (["rollout.router_url=http://r:30100"], "needs rollout.urls"),
    (["rollout.router=true", "rollout.router_url=http://r:30100", f"rollout.urls={URLS}"],
     "set only one of them"),
    (["rollout.router_url=r:30100", f"rollout.urls={URLS}"], "not an http"),
    (["rollout.router_url=http://node3:30000", f"rollout.urls={URLS}"], "also listed"),
    (["rollout.urls=[]"], "empty list"),
    (['rollout.urls=["node3:30000"]'], "not an http"),
    (['rollout.urls=["http://a:1","http://a:1/"]'], "twice"),
    (["rollout.router=true", "rollout.seeded=true"], "seeded"),
    (["rollout.router_url=http://r:1", f"rollout.urls={URLS}", "rollout.seeded=true"], "seeded"),
    (["rollout.router_policy=fastest"], "not a supported choice"),
    (['rollout.sync_address=""'], "empty"),
])
def test_router_and_url_combinations_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, overrides))


def test_valid_router_configs():
    for overrides in (["rollout.router=true", "rollout.router_policy=round_robin"],
                      ["rollout.router_url=http://r:30100", f"rollout.urls={URLS}",
                       "rollout.sync_address=auto"],
                      [f"rollout.urls={URLS}"]):
        validate(load_config(None, overrides))


def test_sync_address(monkeypatch):
    monkeypatch.delenv("SRFT_SYNC_ADDR", raising=False)
    local = ["http://127.0.0.1:30000", "http://localhost:30001"]
    assert resolve_sync_address(None, local) == "127.0.0.1"
    assert resolve_sync_address("auto", local) == "127.0.0.1"
    assert resolve_sync_address("10.0.0.9", local) == "10.0.0.9"
    remote = ["http://127.0.0.1:30000", "http://10.20.30.40:30000"]
    auto = resolve_sync_address("auto", remote)  # the interface towards 10.20.30.40
    assert resolve_sync_address(None, remote) == auto
    socket.inet_aton(auto)
    monkeypatch.setenv("SRFT_SYNC_ADDR", "192.168.7.7")  # per node, wins over the config
    assert resolve_sync_address("10.0.0.9", remote) == "192.168.7.7"


def test_launched_router_listens_on_loopback_only():
    r = SGLangRouter(["http://127.0.0.1:1", "http://127.0.0.1:2"], port=31001,
                     policy="round_robin")
    r.metrics_port = 31002
    cmd = r.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--prometheus-port") + 1] == "31002"
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--policy")] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert r.url == "http://127.0.0.1:31001" and r.owned


# --------------------------------------------------------------------------- fakes
class _Recorder(JsonHandler):
    """A fake SGLang server (or router): records each request; ``fail_generate`` 503s."""

    def do_GET(self):
        st = self.server.state
        st["calls"].append(("GET", self.path))
        if self.path == "/model_info":
            return self._reply(200, {"weight_version": st["version"]})
        return self._reply(200, {})

    def do_POST(self):
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        st["calls"].append(("POST", self.path))
        if self.path == "/update_weight_version":
            st["version"] = body["new_version"]
        if self.path == "/generate":
            if st["fail_generate"] > 0:
                st["fail_generate"] -= 1
                return self._reply(503, {"error": "no healthy worker"})
            item = {"text": "ok", "output_ids": [7],
                    "meta_info": {"output_token_logprobs": [[-0.5, 7, None]],
                                  "finish_reason": {"type": "length", "length": 1},
                                  "prompt_tokens": 1, "weight_version": st["version"]}}
            n = body["sampling_params"]["n"]
            return self._reply(200, [item] * n if n > 1 else item)
        return self._reply(200, {"success": True})


@pytest.fixture
def fakes():
    started = []

    def start(version=None):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        httpd.state = {"calls": [], "version": version, "fail_generate": 0}
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def _paths(state, method="POST"):
    return [p for m, p in state["calls"] if m == method]


def test_generate_goes_through_the_router_and_the_sync_to_every_server(fakes, tmp_path):
    (s1, u1), (s2, u2), (router_state, router_url) = fakes(), fakes(), fakes()
    eng = RolloutEngine([SGLangServer.attach(u1), SGLangServer.attach(u2)], mode="disk",
                        work_dir=str(tmp_path), bucket_mb=1, request_timeout_s=10,
                        router=SGLangRouter.attach(router_url), retries=0)
    stats = eng.sync_tensors(lambda: iter([("w", torch.ones(4))]), version="v1")
    assert stats.servers == 2
    for st in (s1, s2):  # each server got the whole update, the router none of it
        assert "/update_weights_from_disk" in _paths(st)
        assert st["version"] == "v1"
    assert _paths(router_state) == []
    router_state["version"] = "v1"  # what the servers behind a router would report
    groups = eng.generate([[1, 2], [3]], n=3)
    assert [len(g) for g in groups] == [3, 3]
    assert {c.server for g in groups for c in g} == {router_url}
    assert _paths(router_state) == ["/generate", "/generate"]
    assert "/generate" not in _paths(s1) + _paths(s2)
    # a failure through the router names no server: every server is probed, then a retry
    router_state["fail_generate"] = 1
    assert eng.generate([[1]], n=1)[0][0].weight_version == "v1"
    for st in (s1, s2):
        assert "/health_generate" in _paths(st, "GET")
    assert "rollout/router_restarts" not in eng.metrics()  # attached: not ours to restart


def test_an_attached_router_that_is_down_is_reported(fakes, tmp_path):
    (_, u1) = fakes()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    eng = RolloutEngine([SGLangServer.attach(u1)], mode="disk", work_dir=str(tmp_path),
                        request_timeout_s=5, router=SGLangRouter.attach(dead), retries=0,
                        health_timeout_s=2)
    with pytest.raises(RolloutError, match="does not answer /health.*rollout.router_url"):
        eng.generate([[1]], n=1)


# --------------------------------------------------------------------------- real servers
PROMPT = [11, 57, 203, 96, 140, 33, 71]


def _port_in_range(used: set) -> int:
    """A free port in 31000-31999, away from the ephemeral range that the weight-sync
    groups and SGLang's own sockets draw from."""
    for port in random.sample(range(31000, 32000), 1000):
        if port in used:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise RuntimeError("no free port in 31000-31999")


def _generates(log_path: str) -> int:
    with open(log_path, errors="replace") as f:
        return sum("POST /generate" in line for line in f)


def _router_job(urls: list, logs: list, model_dir: str, work_dir: str) -> dict:
    """One rank: a router launched by the engine in front of two attached servers; greedy
    rollouts through it, a weight sync, greedy rollouts again and straight from each server,
    a router attached by URL, then the launched router killed and restarted by recovery."""
    from safetensors.torch import load_file

    import srft_mcore.rollout.router as router_mod
    from srft_mcore.config import RolloutConfig
    from srft_mcore.rollout.client import SamplingParams, SGLangClient

    used: set = set()
    router_mod.free_port = lambda: _port_in_range(used)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    cfg = RolloutConfig(urls=urls, router=True, router_policy="round_robin",
                        request_timeout_s=120, startup_timeout_s=120, bucket_mb=1)
    engine = RolloutEngine.launch(cfg, work_dir=work_dir)
    out = {"router_url": engine.router.url, "router_cmd": engine.router.command(),
           "sync_address": engine.sync_address}
    try:
        counts = [_generates(p) for p in logs]
        before = engine.generate([PROMPT] * 4, n=2, sampling=greedy)
        out["served"] = [_generates(p) - c for p, c in zip(logs, counts)]
        out["before"] = {tuple(c.token_ids) for g in before for c in g}
        out["before_servers"] = {c.server for g in before for c in g}
        weights = load_file(os.path.join(model_dir, "model.safetensors"))
        gen = torch.Generator().manual_seed(0)
        new = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
               for k, v in weights.items()}
        stats = engine.sync_tensors(lambda: iter(new.items()), version="v7")
        out["synced_servers"] = stats.servers
        # one weight-update group spans both servers: one broadcast per bucket reaches both
        out["groups"] = [len(members) for members in engine.transport._groups]
        out["versions"] = [SGLangClient([u]).weight_version(u) for u in urls]
        after = engine.generate([PROMPT] * 4, n=2, sampling=greedy)
        out["after"] = {tuple(c.token_ids) for g in after for c in g}
        out["after_versions"] = {c.weight_version for g in after for c in g}
        out["direct"] = [tuple(SGLangClient([u]).generate([PROMPT], n=1, sampling=greedy)[0][0]
                               .token_ids) for u in urls]
        # a router someone else runs: attached by URL, the servers listed beside it
        attached = RolloutEngine.launch(RolloutConfig(urls=urls, router_url=engine.router.url),
                                        work_dir=work_dir)
        out["attached"] = attached.generate([PROMPT], n=1, sampling=greedy)[0][0].token_ids
        attached.shutdown()  # owns nothing: the router and the servers stay up
        out["router_alive_after_attached"] = engine.router.is_alive()
        # the launched router dies: the failed request names it, recovery restarts it
        old_pid = engine.router.pid
        os.killpg(old_pid, signal.SIGKILL)
        again = engine.generate([PROMPT], n=1, sampling=greedy)
        out["after_router_restart"] = again[0][0].token_ids
        out["router_pids"] = (old_pid, engine.router.pid)
        out["metrics"] = engine.metrics()
    finally:
        pid = engine.router.pid
        engine.shutdown()
    out["router_pid_gone"] = not _pid_alive(pid)
    return out


def _pid_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_two_real_servers_behind_a_launched_router(tmp_path, shared_sglang):
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    # the session's shared server (reset to the stock weights after the lease) and one more
    own = SGLangServer(EMBEDDED_MODEL_DIR, port=_port_in_range(set()),
                       log_path=str(tmp_path / "sglang-own.log"), startup_timeout_s=300)
    try:
        own.start()
        with shared_sglang.lease():
            own.wait_healthy()
            servers = [shared_sglang.server, own]
            urls = [s.url for s in servers]
            out = spawn_ranks(_router_job, 1, (urls, [s.log_path for s in servers],
                                               EMBEDDED_MODEL_DIR, str(tmp_path / "work")),
                              timeout_s=600)[0]
            alive = [s.is_alive() for s in servers]
    finally:
        own.stop()
    assert out["router_url"].startswith("http://127.0.0.1:3")
    cmd = out["router_cmd"]
    assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert out["sync_address"] == "127.0.0.1"
    # /generate went through the router, which spread it over both servers
    assert out["before_servers"] == {out["router_url"]}
    assert all(n > 0 for n in out["served"]), out["served"]
    assert len(out["before"]) == 1  # greedy: the same continuation from either server
    # the weight update reached both servers directly: their version and their outputs
    assert out["synced_servers"] == 2 and out["versions"] == ["v7", "v7"]
    assert out["groups"] == [2]
    assert out["after_versions"] == {"v7"}
    assert out["after"] != out["before"] and len(out["after"]) == 1
    assert out["direct"][0] == out["direct"][1] == next(iter(out["after"]))
    assert tuple(out["attached"]) == out["direct"][0]
    assert out["router_alive_after_attached"]
    assert tuple(out["after_router_restart"]) == out["direct"][0]
    assert out["router_pids"][0] != out["router_pids"][1]
    assert out["metrics"]["rollout/router_restarts"] == 1
    assert out["metrics"]["rollout/server_restarts"] == 0
    assert out["router_pid_gone"] and alive == [True, True]  # the attached servers stay up
