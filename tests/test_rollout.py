"""Rollout client and server lifecycle: load balancing and retries against a fake HTTP
server, the flattened-bucket wire format, the colocated tensor mode (one handle per server
TP rank, buffers kept alive, memory released around training) against a fake SGLang, and
start-up failures of real SGLang servers."""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import torch

from fake_http import (ALL_TAGS, ROUTES, SESSION_ROUTES, FakeSGLang, JsonHandler,
                       fake_state, open_entry, start_fake)
from srft_mcore.launching.distributed import free_port
from srft_mcore.rollout.client import GenerateError, SamplingParams, SGLangClient, parse_completion
from srft_mcore.rollout import sync_buckets, tensor_transport
from srft_mcore.rollout import weight_sync as ws
from srft_mcore.rollout.errors import WeightSyncError
from srft_mcore.rollout.sync_buckets import bucket_metadata as _bucket_metadata, flatten_bucket
from srft_mcore.rollout.sync_types import SourceInfo


# --------------------------------------------------------------------------- fake server
class _Fake(JsonHandler):
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        n = body["sampling_params"]["n"]
        ids = body.get("input_ids") or [ord(c) for c in body["text"]]
        item = {"text": "ok", "output_ids": [ids[0], 7],
                "meta_info": {"output_token_logprobs": [[-0.5, ids[0], None], [-1.0, 7, None]],
                              "finish_reason": {"type": "length", "length": 2},
                              "prompt_tokens": len(ids), "weight_version": "v3"}}
        self._reply(200, [item] * n if n > 1 else item)


@pytest.fixture
def fake_url():
    _Fake.calls = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_generate_orders_results_and_sends_sampling(fake_url):
    client = SGLangClient([fake_url], max_concurrency=2)
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, stop=["\n"])
    groups = client.generate(["ab", [9, 8, 7], "c"], n=3, sampling=sp)
    assert [len(g) for g in groups] == [3, 3, 3]
    assert [g[0].token_ids[0] for g in groups] == [ord("a"), 9, ord("c")]  # prompt order kept
    c = groups[1][0]
    assert c.logprobs == [-0.5, -1.0] and c.finish_reason == "length"
    assert c.prompt_tokens == 3 and c.weight_version == "v3" and c.server == fake_url
    sent = _Fake.calls[0]["sampling_params"]
    assert sent == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5, "stop": ["\n"],
                    "ignore_eos": False, "n": 3}
    assert all(call["return_logprob"] for call in _Fake.calls)


def test_dead_server_is_skipped_then_reported(fake_url):
    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([dead, fake_url], retries=2, backoff_s=0.01)
    groups = client.generate([[1, 2]] * 6, n=1)
    assert all(g[0].server == fake_url for g in groups)
    only_dead = SGLangClient([dead], retries=1, backoff_s=0.01)
    with pytest.raises(GenerateError) as err:
        only_dead.generate([[1, 2]], n=2)
    assert err.value.failed_urls == [dead]


def test_parse_completion_without_logprobs():
    c = parse_completion({"text": "x", "output_ids": [4, 5],
                          "meta_info": {"finish_reason": {"type": "stop", "matched": 5}}}, "u")
    assert c.token_ids == [4, 5] and c.logprobs is None and c.finish_reason == "stop"


def test_flattened_bucket_round_trips_through_sglang_reader():
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    g = torch.Generator().manual_seed(0)
    bucket = [("a.bias", torch.randn(3, generator=g).bfloat16()),
              ("b.weight", torch.randn(4, 5, generator=g)),
              ("c.weight", torch.randn(2, 3, generator=g).bfloat16()),
              ("d.weight", torch.randn(7, generator=g))]
    flat, names, dtypes, shapes = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8
    assert flat.numel() == sum(t.numel() * t.element_size() for _, t in bucket)
    # the receiver of the distributed mode allocates from (names, dtypes, shapes) only, as
    # SGLang's bucketed update does: empty tensors flattened, the broadcast lands in that
    recv = FlattenedTensorBucket(named_tensors=[
        (n, torch.empty(shape, dtype=getattr(torch, d))) for n, d, shape in
        zip(names, dtypes, shapes)])
    recv.get_flattened_tensor().copy_(flat)
    got = dict(recv.reconstruct_tensors())
    # the tensor mode sends our metadata with the flat tensor
    via_meta = dict(FlattenedTensorBucket(flattened_tensor=flat, metadata=_bucket_metadata(
        names, dtypes, shapes)).reconstruct_tensors())
    for name, t in bucket:
        assert torch.equal(got[name], t) and torch.equal(via_meta[name], t)


# --------------------------------------------------------------------------- colocated tensor mode
def _serve_fake_process(port_queue) -> None:
    """A fake SGLang in its own process, as the real one is: handles are opened there."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    httpd.state = fake_state(cuda=True)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


@pytest.fixture
def fake_sglang_process():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve_fake_process, args=(q,), daemon=True)
    proc.start()
    try:
        yield f"http://127.0.0.1:{q.get(timeout=120)}"
    finally:
        proc.terminate()
        proc.join(10)


@pytest.fixture
def shm_sharing():
    """The tensor mode's CPU sharing strategy, restored afterwards."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    tensor_transport._detach_shm_manager_from_stdio()
    yield
    torch.multiprocessing.set_sharing_strategy(before)


def test_colocated_plan_puts_each_server_rank_on_its_trainer_rank():
    assert tensor_transport.colocated_plan(2, 2, 4, on_gpu=True) == [[0, 1], [2, 3]]
    assert tensor_transport.colocated_plan(1, 2, 8, on_gpu=True) == [[0, 1]]
    with pytest.raises(WeightSyncError, match="2 servers x server_tp 2 need 4 GPUs"):
        tensor_transport.colocated_plan(2, 2, 2, on_gpu=True)
    # shared memory opens anywhere: CPU ranks wrap around a small world
    assert tensor_transport.colocated_plan(2, 1, 1, on_gpu=False) == [[0], [0]]
    # two nodes of 4 ranks, a TP2 server each: each server reads from its own node's ranks
    assert tensor_transport.colocated_plan(2, 2, 8, on_gpu=True, per_node=4) == [[0, 1],
                                                                                [4, 5]]
    assert tensor_transport.colocated_plan(4, 1, 2, on_gpu=False, per_node=1) == [[0], [0],
                                                                                 [1], [1]]
    with pytest.raises(WeightSyncError, match="multiple of 2"):
        tensor_transport.colocated_plan(3, 1, 8, on_gpu=True, per_node=4)
    # a re-sync of the second server alone (after its restart) still finds its GPUs
    transport = tensor_transport.TensorTransport(server_tp=2, placement=["http://a", "http://b"])
    assert transport.plan(["http://b"], world=4, on_gpu=True) == [[2, 3]]


def test_payload_has_one_entry_per_server_tp_rank_from_its_own_rank(shm_sharing):
    # four "trainer ranks", each with its own copy of one bucket (marked by its rank)
    bucket = [("a.weight", torch.zeros(3, 4)), ("b.bias", torch.zeros(5))]
    flat0, names, dtypes, shapes = flatten_bucket(bucket)
    meta = _bucket_metadata(names, dtypes, shapes)
    copies = [torch.full_like(flat0.view(torch.float32), g + 1.0).view(torch.uint8)
              for g in range(4)]
    handles = [tensor_transport.serialize_bucket(c, meta) for c in copies]
    plan = tensor_transport.colocated_plan(2, 2, 4, on_gpu=True)
    payloads = tensor_transport.server_payloads(handles, plan)
    assert [len(p) for p in payloads] == [2, 2]
    for s, entries in enumerate(payloads):
        for r, entry in enumerate(entries):
            opened = open_entry(entry)
            assert opened["tensors"] == {"a.weight": plan[s][r] + 1.0,
                                         "b.bias": plan[s][r] + 1.0}, (s, r)
    with pytest.raises(WeightSyncError, match=r"server 1: trainer ranks \[3\]"):
        tensor_transport.server_payloads(handles[:3] + [None], plan)


def test_colocated_gpu_servers_start_at_their_trainer_ranks_gpus(monkeypatch):
    from srft_mcore.config import RolloutConfig
    from srft_mcore.rollout import engine

    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    monkeypatch.delenv("SRFT_ROLLOUT_GPUS", raising=False)
    cfg = RolloutConfig(weight_sync="tensor", server_tp=2, num_servers=2)
    assert [engine.colocated_gpu_args(cfg, i) for i in (0, 1)] == [
        ["--base-gpu-id", "0"], ["--base-gpu-id", "2"]]
    assert engine.colocated_gpu_args(RolloutConfig(weight_sync="distributed"), 1) == []
    monkeypatch.setenv("SRFT_ROLLOUT_GPUS", "4,5,6,7")  # placed explicitly: left alone
    assert engine.colocated_gpu_args(cfg, 1) == []


def _stream(n: int, value: float = 1.0, prefix: str = "w"):
    return [(f"{prefix}{i}", torch.full((64,), value + i)) for i in range(n)]


def test_buffers_live_until_the_server_answers_then_are_freed(shm_sharing, monkeypatch):
    import gc
    import weakref

    refs = []

    def recording(bucket):
        out = flatten_bucket(bucket)
        refs.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(sync_buckets, "flatten_bucket", recording)
    state = fake_state()
    alive_during_post = []
    state["probe"] = lambda: alive_during_post.append(refs[-1]() is not None)
    httpd, url = start_fake(state)
    try:
        src = SourceInfo(rank=0, pp_rank=0, exports=True, sends=True)
        stats = ws.sync_weights(tensor_transport.TensorTransport(server_tp=2), [url], src, "v1",
                                lambda: _stream(5), bucket_bytes=512)
    finally:
        httpd.shutdown()
        httpd.server_close()
    gc.collect()
    assert stats.buckets == 3 and stats.bytes == 5 * 64 * 4  # 2 + 2 + 1 tensors
    assert alive_during_post == [True, True, True]
    assert [r() for r in refs] == [None, None, None]
    # one entry per server TP rank; both TP ranks read the same (only) trainer rank here
    assert [len(u) for u in state["updates"]] == [2, 2, 2]
    assert state["updates"][2][1]["tensors"] == {"w4": 5.0}


def _fake_engine(url: str, tmp_path, mode: str = "tensor"):
    from srft_mcore.rollout.engine import RolloutEngine
    from srft_mcore.rollout.server import SGLangServer

    return RolloutEngine([SGLangServer.attach(url)], mode=mode, bucket_mb=0.001,
                         work_dir=str(tmp_path), request_timeout_s=10, server_tp=2)


def test_memory_is_released_for_training_and_resumed_around_the_sync(shm_sharing, tmp_path):
    from srft_mcore.rollout.errors import RolloutError

    state = fake_state(busy=2)  # the first two releases find a batch still finishing
    httpd, url = start_fake(state)
    try:
        eng = _fake_engine(url, tmp_path)
        eng.sync_tensors(lambda: _stream(3), version="1")
        assert eng.generate([[1, 2]], n=1)[0][0].weight_version == "1"
        state["calls"].clear()

        eng.before_train()
        eng.before_train()  # already released: no second request
        assert state["released"] == set(ALL_TAGS)
        assert eng.released == {url: sorted(ALL_TAGS)}
        with pytest.raises(RolloutError, match="call sync_weights before generating"):
            eng.generate([[1, 2]], n=1)
        eng.sync_tensors(lambda: _stream(3, value=10.0), version="2")
        assert state["released"] == set() and eng.released == {}
        eng.after_train()  # nothing left to resume: no request
        assert eng.generate([[1, 2]], n=1)[0][0].weight_version == "2"
        assert eng.metrics()["rollout/memory_requests"] == 3
    finally:
        httpd.shutdown()
        httpd.server_close()
    paths = [p for p, _ in state["calls"]]
    release = [i for i, p in enumerate(paths) if p == "/release_memory_occupation"]
    assert len(release) == 3  # two refused while busy, then accepted
    resumes = [(i, tags) for i, (p, tags) in enumerate(state["calls"])
               if p == "/resume_memory_occupation"]
    assert [tags for _, tags in resumes] == [["weights"], ["kv_cache", "cuda_graph"]]
    updates = [i for i, p in enumerate(paths) if p == "/update_weights_from_tensor"]
    begin, end = paths.index("/begin_weight_update"), paths.index("/continue_generation")
    # release < resume weights < begin < updates < continue generating < resume the rest
    assert release[-1] < resumes[0][0] < begin < updates[0] <= updates[-1] < end < resumes[1][0]
    assert paths[-1] == "/generate"
    assert state["updates"][-1][0]["tensors"] == {"w0": 10.0, "w1": 11.0, "w2": 12.0}


def test_memory_stays_put_when_servers_have_their_own_gpus(tmp_path):
    state = fake_state()
    httpd, url = start_fake(state)
    try:
        eng = _fake_engine(url, tmp_path, mode="disk")
        eng.before_train()
        eng.after_train()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert state["calls"] == [] and eng.released == {}


# --------------------------------------------------------------------------- sync protocol
SESSION_STEP = ["/pause_generation", "/flush_cache", "/begin_weight_update", "UPDATE",
                "/end_weight_update", "/update_weight_version", "/flush_cache",
                "/continue_generation"]
PLAIN_STEP = ["/pause_generation", "/flush_cache", "UPDATE", "/update_weight_version",
              "/continue_generation"]  # SGLang 0.5.19: no session routes
UPDATE_ROUTE = {"disk": "/update_weights_from_disk", "tensor": "/update_weights_from_tensor"}


def _sync_steps(calls: list, update: str) -> list:
    """The POSTs of each sync in a run (the calls between two /generate), with a run of
    update requests (one per bucket) shown as one UPDATE."""
    steps, current = [], []
    for path, _ in calls:
        if path == "/generate":
            steps.append(current)
            current = []
        elif path == update:
            if not current or current[-1] != "UPDATE":
                current.append("UPDATE")
        else:
            current.append(path)
    return steps + [current]


@pytest.mark.parametrize("mode", ["disk", "tensor"])
@pytest.mark.parametrize("server", ["0.5.23", "0.5.19", "0.5.19-no-openapi"])
def test_each_step_syncs_with_the_protocol_the_server_has(shm_sharing, tmp_path, mode, server):
    """A server with the session routes gets begin/end around the update; one without
    (SGLang 0.5.19) gets pause -> flush -> update -> version -> continue, every step; with
    /openapi.json disabled the routes are probed (OPTIONS) and the choice is the same."""
    routes = ROUTES if server == "0.5.23" else ROUTES - set(SESSION_ROUTES)
    state = fake_state(routes=routes, openapi=server != "0.5.19-no-openapi",
                       sglang_version=server.split("-")[0])
    httpd, url = start_fake(state)
    try:
        eng = _fake_engine(url, tmp_path, mode=mode)
        versions = []
        for step in range(1, 4):  # rollout -> (train) -> sync, as the trainer's loop does
            versions.append(eng.generate([[1, 2]], n=2)[0][0].weight_version)
            eng.sync_tensors(lambda: _stream(3, value=float(step)), version=str(step))
        versions.append(eng.generate([[1, 2]], n=1)[0][0].weight_version)
    finally:
        httpd.shutdown()
        httpd.server_close()
    r = eng.routes[url]
    assert r.version == server.split("-")[0] and r.probed == (server == "0.5.19-no-openapi")
    assert r.session == (server == "0.5.23") and eng.sessions == ([url] if r.session else [])
    steps = _sync_steps(state["calls"], UPDATE_ROUTE[mode])
    assert steps[0] == [] and steps[-1] == [] and len(steps) == 5  # nothing before or after
    want = SESSION_STEP if server == "0.5.23" else PLAIN_STEP
    assert steps[1:4] == [want] * 3
    assert [v for p, v in state["calls"] if p == "/update_weight_version"] == ["1", "2", "3"]
    assert versions == [None, "1", "2", "3"]  # each rollout saw the weights synced before it
    assert len(state["updates"]) >= 3


@pytest.mark.parametrize("openapi", [True, False], ids=["openapi", "probed"])
def test_a_server_without_the_modes_update_route_is_refused_before_any_sync(tmp_path, openapi):
    from srft_mcore.rollout.errors import UnsupportedServer

    state = fake_state(routes=ROUTES - set(SESSION_ROUTES) - {"/update_weights_from_distributed"},
                       openapi=openapi, sglang_version="0.5.19")
    httpd, url = start_fake(state)
    try:
        with pytest.raises(UnsupportedServer) as err:
            _fake_engine(url, tmp_path, mode="distributed")
    finally:
        httpd.shutdown()
        httpd.server_close()
    msg = str(err.value)
    assert "\n" not in msg  # one paragraph
    assert f"{url} (SGLang 0.5.19) does not serve /update_weights_from_distributed" in msg
    assert "rollout.weight_sync=distributed cannot update" in msg
    assert "it would take rollout.weight_sync=tensor or disk" in msg  # the other fixes
    assert "Fix: run SGLang 0.5.19 or 0.5.23" in msg
    assert ("probed with OPTIONS" in msg) == (not openapi)
    assert state["calls"] == []  # refused before anything was posted


def test_a_sync_that_keeps_failing_is_retried_then_names_server_and_route(tmp_path):
    from srft_mcore.rollout.errors import RolloutError

    state = fake_state(routes=ROUTES - set(SESSION_ROUTES), fail={"/update_weights_from_disk"})
    httpd, url = start_fake(state)
    try:
        eng = _fake_engine(url, tmp_path, mode="disk")
        eng.sync_retry_wait_s = 0.0
        with pytest.raises(WeightSyncError) as err:
            eng.sync_tensors(lambda: _stream(2), version="1")
        with pytest.raises(RolloutError, match="call sync_weights again"):
            eng.generate([[1, 2]], n=1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert err.value.where == [(url, "/update_weights_from_disk")]
    assert "(attempt 3 of 3)" in str(err.value) and "injected failure" in str(err.value)
    paths = [p for p, _ in state["calls"]]
    assert paths.count("/update_weights_from_disk") == 3
    # each failed attempt left the server generating again, with its old version
    assert paths.count("/continue_generation") == 3 and not state["paused"]
    assert state["version"] is None


def _colocated_job(url: str, device: str, phases: tuple) -> dict:
    """Two trainer ranks, one server with TP2 (rank r holds the copy for TP rank r)."""
    import gc
    import weakref

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo")
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
    import srft_mcore.launching.distributed as sd

    # the life of each tensor this rank hands out, against the moment rank 0 says that the
    # servers have answered (its status broadcast); and whether any copy outlives the sync
    refs, events = [], []
    real_flatten, real_serialize = sync_buckets.flatten_bucket, tensor_transport.serialize_bucket
    real_broadcast = sd.broadcast_object

    def flattening(bucket):
        out = real_flatten(bucket)
        refs.append(weakref.ref(out[0]))
        return out

    def serializing(flat, metadata):
        k = sum(e.startswith("made") for e in events)
        events.append(f"made{k}")
        weakref.finalize(flat, events.append, f"freed{k}")
        return real_serialize(flat, metadata)

    def told(*args, **kwargs):
        out = real_broadcast(*args, **kwargs)
        events.append("told")
        return out

    sync_buckets.flatten_bucket, tensor_transport.serialize_bucket = flattening, serializing
    sd.broadcast_object = told
    transport = tensor_transport.TensorTransport(server_tp=2)
    stats = {}
    if "pp1" in phases:
        # rank-specific values (fault injection): an entry shows which rank it came from
        src = SourceInfo(rank=rank, pp_rank=0, exports=True, sends=rank == 0)
        s = ws.sync_weights(transport, [url], src, "pp1",
                            lambda: [(n, t.to(dev)) for n, t in _stream(4, 10.0 * rank)],
                            bucket_bytes=512, group=group)
        stats["pp1"] = (s.bytes, s.buckets)
    pp1_events = list(events)
    if "pp2" in phases:
        # PP2 over the world: each rank is a stage with its own layers; both TP ranks of the
        # server need both stages' buckets
        src = SourceInfo(rank=rank, pp_rank=rank, exports=True, sends=True, pp=2)
        s = ws.sync_weights(transport, [url], src, "pp2",
                            lambda: _stream(3, 100.0 * (rank + 1), prefix=f"s{rank}.w"),
                            bucket_bytes=512, group=group)
        stats["pp2"] = (s.bytes, s.buckets)
    gc.collect()
    return dict(stats=stats, flats=len(refs), alive=sum(r() is not None for r in refs),
                pp1_events=pp1_events,
                device=str(torch.cuda.current_device()) if device == "cuda" else "cpu")


def _run_colocated(url: str, device: str, phases: tuple) -> tuple[list, dict]:
    import requests

    from srft_mcore.launching.local import spawn_ranks

    results = spawn_ranks(_colocated_job, 2, (url, device, phases), timeout_s=300)
    return results, requests.get(url + "/calls", timeout=10).json()


@pytest.mark.slow
def test_each_server_tp_rank_reads_its_own_trainer_rank_on_cpu(fake_sglang_process):
    results, seen = _run_colocated(fake_sglang_process, "cpu", ("pp1", "pp2"))
    pp1, pp2 = seen["updates"][:2], seen["updates"][2:]
    # pp1: rank r's copy went to TP rank r, read in the server's own process (shared
    # memory: a copy freed before the POST could not have been opened)
    assert [sorted(e["tensors"]) for e in pp1[0]] == [["w0", "w1"], ["w0", "w1"]]
    for bucket in pp1:
        for r, entry in enumerate(bucket):
            assert all(v - 10.0 * r in (0.0, 1.0, 2.0, 3.0) for v in entry["tensors"].values())
    assert pp1[1][1]["tensors"] == {"w2": 12.0, "w3": 13.0}
    # pp2: stage 1's buckets reached rank 0 (and stage 0's rank 1) by the PP broadcast
    assert len(pp2) == 4
    for r in (0, 1):
        assert [sorted(b[r]["tensors"]) for b in pp2] == [
            ["s0.w0", "s0.w1"], ["s0.w2"], ["s1.w0", "s1.w1"], ["s1.w2"]]
        assert pp2[3][r]["tensors"] == {"s1.w2": 202.0}
    assert results[0]["stats"] == {"pp1": (4 * 256, 2), "pp2": (6 * 256, 4)}
    # each rank frees a copy only after rank 0 has heard back from the server
    kept = ["made0", "told", "freed0", "made1", "told", "freed1"]
    assert [r["pp1_events"] for r in results] == [kept, kept]
    # every copy a rank flattened is gone once the sync returned
    assert [(r["flats"], r["alive"]) for r in results] == [(4, 0), (4, 0)]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU")
def test_each_server_tp_rank_gets_a_cuda_ipc_handle_on_its_own_gpu(fake_sglang_process):
    pytest.importorskip("sglang")
    results, seen = _run_colocated(fake_sglang_process, "cuda", ("pp1",))
    assert len(seen["updates"]) == 2
    for bucket in seen["updates"]:
        for r, entry in enumerate(bucket):
            # opened by CUDA IPC on the GPU of trainer rank r, with rank r's values
            assert entry["device"] == f"cuda:{results[r]['device']}", (r, entry)
            assert all(v - 10.0 * r in (0.0, 1.0, 2.0, 3.0) for v in entry["tensors"].values())
    kept = ["made0", "told", "freed0", "made1", "told", "freed1"]
    assert [r["pp1_events"] for r in results] == [kept, kept]
    assert [(r["flats"], r["alive"]) for r in results] == [(2, 0), (2, 0)]


# --------------------------------------------------------------------------- real servers
@pytest.mark.slow
def test_bad_model_path_fails_fast_with_log_tail(tmp_path):
    from srft_mcore.rollout.server import SGLangServer, ServerStartError

    with pytest.raises(ServerStartError) as err:
        SGLangServer.launch(str(tmp_path / "no-such-model"), startup_timeout_s=120,
                            log_path=str(tmp_path / "server.log"))
    msg = str(err.value)
    # it exited (not the 120 s health timeout), whatever the machine's speed
    assert "exited with code" in msg and "no-such-model" in msg
    tail = msg.split("(tail):\n", 1)[1]
    assert tail.strip() and tail.strip() != "(no log)"
    assert "Traceback" in tail or "Error" in tail or "error" in tail


@pytest.mark.slow
def test_startup_timeout_stops_the_server_and_shows_log(tmp_path):
    from srft_mcore.models.tiny import make_tiny_hf_model
    from srft_mcore.rollout.server import SGLangServer, ServerStartError

    model_dir = make_tiny_hf_model(str(tmp_path / "tiny"), arch="qwen2")
    server = SGLangServer(model_dir, startup_timeout_s=4, log_path=str(tmp_path / "s.log"))
    server.start()
    pid = server.pid
    with pytest.raises(ServerStartError) as err:
        server.wait_healthy()
    assert "not healthy within 4s" in str(err.value) and str(tmp_path / "s.log") in str(err.value)
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone


@pytest.mark.slow
def test_server_dies_with_a_killed_trainer(tmp_path):
    import signal
    import subprocess
    import sys

    from srft_mcore.models.tiny import make_tiny_hf_model

    model_dir = make_tiny_hf_model(str(tmp_path / "tiny"), arch="qwen2")
    script = ("import sys, time\n"
              "from srft_mcore.rollout.server import SGLangServer\n"
              f"s = SGLangServer.launch({model_dir!r}, startup_timeout_s=240)\n"
              "print(s.pid, flush=True)\n"
              "time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(trainer.stdout.readline())
        os.killpg(pid, 0)  # the server's group is up
        trainer.send_signal(signal.SIGKILL)  # no atexit, no handlers: only PDEATHSIG is left
        trainer.wait(10)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
            pytest.fail("the SGLang server outlived its killed launcher")
    finally:
        if trainer.poll() is None:
            trainer.kill()
