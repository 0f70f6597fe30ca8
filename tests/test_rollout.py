"""Rollout client and server lifecycle: load balancing and retries against a fake HTTP
server, the flattened-bucket wire format, and start-up failures of real SGLang servers."""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from srft_mcore.distributed import free_port
from srft_mcore.rollout.client import GenerateError, SamplingParams, SGLangClient, parse_completion
from srft_mcore.rollout.weight_sync import flatten_bucket, _bucket_metadata


# --------------------------------------------------------------------------- fake server
class _Fake(BaseHTTPRequestHandler):
    calls: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        n = body["sampling_params"]["n"]
        ids = body.get("input_ids") or [ord(c) for c in body["text"]]
        item = {"text": "ok", "output_ids": [ids[0], 7],
                "meta_info": {"output_token_logprobs": [[-0.5, ids[0], None], [-1.0, 7, None]],
                              "finish_reason": {"type": "length", "length": 2},
                              "prompt_tokens": len(ids), "weight_version": "v3"}}
        data = json.dumps([item] * n if n > 1 else item).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


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
    # the receiver of the distributed mode allocates from (names, dtypes, shapes) only
    recv = FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
    recv.get_flattened_tensor().copy_(flat)
    got = dict(recv.reconstruct_tensors())
    # the tensor mode sends our metadata with the flat tensor
    via_meta = dict(FlattenedTensorBucket(flattened_tensor=flat, metadata=_bucket_metadata(
        names, dtypes, shapes)).reconstruct_tensors())
    for name, t in bucket:
        assert torch.equal(got[name], t) and torch.equal(via_meta[name], t)


# --------------------------------------------------------------------------- real servers
@pytest.mark.slow
def test_bad_model_path_fails_fast_with_log_tail(tmp_path):
    from srft_mcore.rollout.server import SGLangServer, ServerStartError

    t0 = time.time()
    with pytest.raises(ServerStartError) as err:
        SGLangServer.launch(str(tmp_path / "no-such-model"), startup_timeout_s=120,
                            log_path=str(tmp_path / "server.log"))
    elapsed = time.time() - t0
    msg = str(err.value)
    assert elapsed < 120, elapsed
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
    t0 = time.time()
    with pytest.raises(ServerStartError) as err:
        server.wait_healthy()
    assert time.time() - t0 < 4 + 25  # timeout plus the group's SIGTERM/SIGKILL
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
