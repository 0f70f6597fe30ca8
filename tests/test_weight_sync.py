"""Weight sync into a real SGLang CPU server from Megatron on two gloo ranks (TP2, then PP2).

One spawned 2-rank job shares one engine-owned server across all checks (start-up costs
~30 s): for each layout and each sync mode it perturbs the Megatron weights, syncs, and
compares SGLang's greedy continuation and log-probs with the Megatron model's own greedy
decode (the colocated ``tensor`` mode releases the server's memory right after the rollout,
as before a training step, and the sync brings it back); then it kills the server by PID
during a rollout and checks the recovery. The test functions assert on the collected
results.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import zlib

import pytest
import torch

pytestmark = pytest.mark.slow

MODES = ("disk", "tensor", "distributed")
LAYOUTS = ((2, 1), (1, 2))
PROMPT = [11, 57, 203, 96, 140, 33, 71]
N_NEW = 12


# --------------------------------------------------------------------------- rank helpers
def _perturb(model, layout, seed: int) -> None:
    """Add the same noise a TP1 model would get, split for this rank (per global name)."""
    from srft_mcore.models.sharding import full_shape, global_name, partition_dim, split_for_rank

    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = global_name(model, name)
            g = torch.Generator().manual_seed(seed + zlib.crc32(gname.encode()))
            noise = torch.randn(full_shape(p, layout.tp), generator=g) * 0.1
            p.add_(split_for_rank(noise, gname, partition_dim(p), layout.tp, layout.tp_rank))


@torch.no_grad()
def megatron_greedy(model, layout, vocab: int, prompt: list, n_new: int):
    """Greedy decode by full forwards on the growing sequence; returns (ids, logprobs)."""
    import torch.distributed as dist

    tokens, logprobs = list(prompt), []
    for _ in range(n_new):
        ids = torch.tensor([tokens])
        pos = torch.arange(len(tokens))[None]
        if not layout.is_first_stage:
            hidden = torch.empty(len(tokens), 1, model.config.hidden_size)
            dist.recv(hidden, src=dist.get_global_rank(layout.pp_group, layout.pp_rank - 1))
            model.set_input_tensor(hidden)
        out = model(ids, pos, None)
        if not layout.is_last_stage:
            dist.send(out.contiguous(),
                      dst=dist.get_global_rank(layout.pp_group, layout.pp_rank + 1))
        step = torch.zeros(2, dtype=torch.float64)
        if layout.is_last_stage:
            shard = out[0, -1].float()
            parts = [torch.empty_like(shard) for _ in range(layout.tp)]
            dist.all_gather(parts, shard.contiguous(), group=layout.tp_group)
            logp = torch.log_softmax(torch.cat(parts)[:vocab], dim=-1)
            nxt = int(logp.argmax())
            step = torch.tensor([nxt, float(logp[nxt])], dtype=torch.float64)
        if layout.pp > 1:
            dist.broadcast(step, group=layout.pp_group, group_src=layout.pp - 1)
        tokens.append(int(step[0]))
        logprobs.append(float(step[1]))
    return tokens[len(prompt):], logprobs


def _greedy(engine, prompts):
    from srft_mcore.rollout.client import SamplingParams

    return engine.generate(prompts, n=1, broadcast=True, sampling=SamplingParams(
        temperature=0.0, max_new_tokens=N_NEW, ignore_eos=True))


def _rank_job(model_dir: str, work_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from srft_mcore.models.bridge import load_hf_into_model
    from srft_mcore.config import ModelConfig, ParallelConfig, RolloutConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models.builder import build_model
    from srft_mcore.rollout.client import SamplingParams
    from srft_mcore.rollout.engine import RolloutEngine

    hf = load_hf_config(model_dir)
    out: dict = {"phases": {}}
    cfg = RolloutConfig(bucket_mb=1, startup_timeout_s=240, request_timeout_s=60)
    engine = None
    seed = 100
    for tp, pp in LAYOUTS:
        layout = init_distributed(tp=tp, pp=pp, backend="gloo")
        model = build_model(hf, ModelConfig(), ParallelConfig(tp=tp, pp=pp))
        model.eval()
        load_hf_into_model(model, model_dir, hf, tp_group=layout.tp_group)
        if engine is None:
            engine = RolloutEngine.launch(cfg, model_path=model_dir, layout=layout, hf_config=hf,
                                          work_dir=work_dir)
            if layout.rank == 0:  # what the engine read of the server's routes at start-up
                from srft_mcore.rollout.server_routes import routes_of_interest, probe_routes

                url = engine.urls[0]
                r = engine.routes[url]
                out["routes"] = dict(
                    session=r.session, sessions=engine.sessions, url=url, version=r.version,
                    probed=r.probed, missing={m: r.missing(m) for m in MODES},
                    listed=sorted(p for p in routes_of_interest() if p in r.paths),
                    by_options=sorted(probe_routes(url, routes_of_interest())))
            # client features on the fresh server: n samples, stop strings, finish reasons
            if layout.rank == 0:
                groups = engine.client.generate(
                    ["1 + 2 =", PROMPT], n=3,
                    sampling=SamplingParams(temperature=1.0, max_new_tokens=6))
                out["client"] = [[(len(c.token_ids), len(c.logprobs), c.finish_reason,
                                   c.text) for c in g] for g in groups]
            dist.barrier()
        for mode in MODES:
            eng = RolloutEngine(engine.servers, mode=mode, layout=layout, hf_config=hf,
                                bucket_mb=0.2, work_dir=work_dir, request_timeout_s=60)
            before = _greedy(eng, [PROMPT])
            eng.before_train()  # right after a rollout, as the trainer does
            released = eng.released
            seed += 1
            _perturb(model, layout, seed)
            version = f"tp{tp}pp{pp}-{mode}"
            stats = eng.sync_weights(model, version=version)
            resident = eng.released
            after = _greedy(eng, [PROMPT])
            mg_ids, mg_lp = megatron_greedy(model, layout, hf["vocab_size"], PROMPT, N_NEW)
            if layout.rank == 0:
                out["phases"][version] = dict(
                    before=before[0][0].token_ids, sg_ids=after[0][0].token_ids,
                    sg_lp=after[0][0].logprobs, mg_ids=mg_ids, mg_lp=mg_lp,
                    reported=eng.client.weight_version(eng.urls[0]),
                    completion_version=after[0][0].weight_version,
                    seconds=stats.seconds, bytes=stats.bytes, buckets=stats.buckets,
                    released=released, resident=resident, memory_calls=eng.memory_calls)
            eng.transport.close()
        last = (model, layout)
        ps.destroy_model_parallel()
        if (tp, pp) != LAYOUTS[-1]:
            del model

    # ---- kill the server by PID during a rollout; the engine restarts and re-syncs
    model, _ = last
    layout = init_distributed(tp=LAYOUTS[-1][0], pp=LAYOUTS[-1][1], backend="gloo")
    eng = RolloutEngine(engine.servers, mode="distributed", layout=layout, hf_config=hf,
                        bucket_mb=1, work_dir=work_dir, request_timeout_s=60, retries=1,
                        sync_retries=0)  # the bad sync below fails at once
    # ---- a sync the server rejects (a tensor of the wrong shape) fails on every rank, blocks
    # rollouts, and the retry with the right tensors works
    from srft_mcore.rollout.errors import RolloutError
    from srft_mcore.rollout.sync_types import source_info
    from srft_mcore.rollout.errors import WeightSyncError
    from srft_mcore.rollout.weight_sync import export_stream

    seed += 1
    _perturb(model, layout, seed)
    src = source_info(layout)
    bad = [("model.norm.weight", torch.zeros(5))] if layout.is_last_stage else []
    failed = {}
    try:
        eng.sync_tensors(lambda: itertools.chain(export_stream(model, hf, src), bad),
                         version="bad")
    except WeightSyncError as e:
        failed["sync"] = str(e)
    try:
        _greedy(eng, [PROMPT])
    except RolloutError as e:
        failed["generate"] = str(e)
    eng.sync_weights(model, version="before-kill")
    if layout.rank == 0:
        out["failed_sync"] = dict(failed, reported=eng.client.weight_version(eng.urls[0]))
    mg_ids, mg_lp = megatron_greedy(model, layout, hf["vocab_size"], PROMPT, N_NEW)
    killed = {}
    if layout.rank == 0:
        server = eng.servers[0]
        old_pid = server.pid

        def killer():
            while sum(eng.client._inflight.values()) == 0:
                time.sleep(0.01)
            time.sleep(0.2)
            os.kill(old_pid, signal.SIGKILL)
            killed["t"] = time.time()

        threading.Thread(target=killer, daemon=True).start()
    t0 = time.time()
    batch = [PROMPT] + [[5 + i, 9, 13 + i, 40] for i in range(15)]
    from srft_mcore.rollout.client import SamplingParams

    during = eng.generate(batch, n=1, broadcast=True, sampling=SamplingParams(
        temperature=0.0, max_new_tokens=64, ignore_eos=True))
    after = _greedy(eng, [PROMPT])
    if layout.rank == 0:
        out["kill"] = dict(killed=bool(killed), old_pid=old_pid, new_pid=eng.servers[0].pid,
                           restarts=eng.metrics()["rollout/server_restarts"],
                           during_ids=during[0][0].token_ids[:N_NEW], after_ids=after[0][0].token_ids,
                           after_lp=after[0][0].logprobs, mg_ids=mg_ids, mg_lp=mg_lp,
                           reported=eng.client.weight_version(eng.urls[0]),
                           seconds=time.time() - t0)

    # ---- a hung server (whole process group stopped): timeout, health check, restart
    eng.client.request_timeout_s = 5.0
    eng.health_timeout_s = 5.0
    if layout.rank == 0:
        os.killpg(eng.servers[0].pid, signal.SIGSTOP)
    t0 = time.time()
    hung = _greedy(eng, [PROMPT])
    if layout.rank == 0:
        out["hang"] = dict(ids=hung[0][0].token_ids, lp=hung[0][0].logprobs, mg_ids=mg_ids,
                           mg_lp=mg_lp, restarts=eng.metrics()["rollout/server_restarts"],
                           seconds=time.time() - t0, pid=eng.servers[0].pid)
    eng.transport.close()
    engine.shutdown()
    if layout.rank == 0:
        pids = (out["kill"]["old_pid"], out["kill"]["new_pid"], out["hang"]["pid"])
        out["pids_after_shutdown"] = [p for p in pids if _alive(p)]
    return out


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie awaiting its parent counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- fixture
def _build_job(root):
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.models.tiny import make_tiny_hf_model

    model_dir = make_tiny_hf_model(str(root / "tiny-qwen2"), arch="qwen2", seed=3)
    return spawn_ranks(_rank_job, 2, (model_dir, str(root / "work")), timeout_s=900)[0]


@pytest.fixture(scope="module")
def job(once):
    """The two-rank job every test here reads: run once per session, whichever worker asks
    first (tests/conftest.py ``once``)."""
    return once("weight_sync_job", _build_job)


# --------------------------------------------------------------------------- tests
def test_client_samples_n_with_logprobs(job):
    groups = job["client"]
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    for g in groups:
        for n_tok, n_lp, reason, text in g:
            assert 1 <= n_tok <= 6 and n_lp == n_tok
            assert reason in ("length", "stop")


def test_real_server_gets_the_protocol_its_routes_allow(job):
    """The release the GPU image runs (0.5.19) has no update session: the engine reads that
    from the real server and syncs by pausing; a release with both session routes gets the
    session. Every mode's update route is there either way."""
    import sglang

    from srft_mcore.rollout.server_routes import SESSION_ROUTES, routes_of_interest

    r = job["routes"]
    assert r["version"] == sglang.__version__ and not r["probed"]  # read from /openapi.json
    has_session = set(SESSION_ROUTES) <= set(r["listed"])
    assert r["session"] == has_session
    assert r["sessions"] == ([r["url"]] if has_session else [])
    assert r["missing"] == {m: [] for m in MODES}  # every mode is possible
    # the fallback for servers without /openapi.json (OPTIONS per route) agrees on a real one
    assert r["by_options"] == r["listed"]
    assert set(routes_of_interest()) - set(r["listed"]) <= set(SESSION_ROUTES)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=["tp2", "pp2"])
@pytest.mark.parametrize("mode", MODES)
def test_sync_matches_megatron_greedy(job, mode, tp, pp):
    ph = job["phases"][f"tp{tp}pp{pp}-{mode}"]
    assert ph["sg_ids"] == ph["mg_ids"], ph
    assert ph["sg_ids"] != ph["before"], "the sync did not change SGLang's output"
    diff = max(abs(a - b) for a, b in zip(ph["sg_lp"], ph["mg_lp"]))
    assert diff <= 1e-3, (diff, ph)
    assert ph["reported"] == ph["completion_version"] == f"tp{tp}pp{pp}-{mode}"
    assert ph["bytes"] > 0 and ph["buckets"] >= 2  # 0.2 MiB buckets: several per stage
    if mode == "tensor":  # the real server accepted the release and both resumes
        assert list(ph["released"].values()) == [["cuda_graph", "kv_cache", "weights"]]
        assert ph["resident"] == {} and ph["memory_calls"] == 3
    else:
        assert ph["released"] == ph["resident"] == {} and ph["memory_calls"] == 0


def test_killed_server_is_restarted_and_resynced(job):
    k = job["kill"]
    assert k["killed"] and k["restarts"] == 1 and k["new_pid"] != k["old_pid"]
    assert k["during_ids"] == k["mg_ids"]
    assert k["after_ids"] == k["mg_ids"]
    assert max(abs(a - b) for a, b in zip(k["after_lp"], k["mg_lp"])) <= 1e-3
    assert k["reported"] == "before-kill"
    assert job["pids_after_shutdown"] == []


def test_failed_sync_blocks_rollout_and_can_be_retried(job):
    f = job["failed_sync"]
    assert "weight sync failed" in f["sync"], f
    assert "call sync_weights again" in f["generate"]
    assert f["reported"] == "before-kill"
    # the greedy checks after the retry are those of the kill test below
    assert job["kill"]["mg_ids"] == job["kill"]["after_ids"]


def test_hung_server_is_detected_and_restarted(job):
    h = job["hang"]
    assert h["restarts"] == 2  # the kill above, then this hang
    assert h["ids"] == h["mg_ids"]
    assert max(abs(a - b) for a, b in zip(h["lp"], h["mg_lp"])) <= 1e-3
