"""A quiet JSON HTTP handler for the tests' fake SGLang servers and routers, and a fake
SGLang server whose HTTP routes are chosen per test (SGLang 0.5.23's, 0.5.19's, fewer)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    """Replies with JSON bodies and does not log each request to stderr."""

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --------------------------------------------------------------------------- fake SGLang
ALL_TAGS = ["kv_cache", "weights", "cuda_graph"]
SESSION_ROUTES = ("/begin_weight_update", "/end_weight_update")
ROUTES = frozenset({
    "/health", "/health_generate", "/generate", "/model_info", "/server_info",
    "/get_server_info", "/flush_cache", "/pause_generation", "/continue_generation",
    "/update_weight_version", "/init_weights_update_group", "/destroy_weights_update_group",
    "/update_weights_from_distributed", "/update_weights_from_tensor",
    "/update_weights_from_disk", "/release_memory_occupation", "/resume_memory_occupation",
    *SESSION_ROUTES})
"""What SGLang 0.5.23 serves of its HTTP API, as far as the trainer uses it; 0.5.19 is the
same without SESSION_ROUTES."""


class FakeSGLang(JsonHandler):
    """The endpoints the engine uses, with SGLang's rules that matter here: a memory tag is
    resumed only after it was released, the first ``busy`` releases find the server not yet
    idle; with the session routes, weights are only written inside a weight-update session
    (0.5.23), without them only while generation is paused (the protocol for 0.5.19); and
    only while their memory is resident. Each ``/update_weights_from_tensor`` entry is
    opened as its TP rank would open it and summarised per tensor (device and mean).

    The routes are ``state["routes"]``: ``/openapi.json`` lists them (unless
    ``state["openapi"]`` is false: then it is 404, as with SGLang's DISABLE_OPENAPI_DOC),
    OPTIONS answers 405 for a route and 404 otherwise (as Starlette does), a POST to another
    route is a 404. Routes in ``state["fail"]`` always answer 400 (``state["fail_after"]``: from a given call on). ``state["calls"]`` records
    every POST as ``[path, tags]`` (the ``/update_weight_version`` ones: ``[path, version]``).
    State: ``self.server.state`` (see :func:`fake_state`)."""

    def do_GET(self):
        st = self.server.state
        path = self.path
        if st["down"]:
            st["down_polls"] += 1
            return self._reply(503, {"detail": "down"})
        if path == "/openapi.json":
            if not st["openapi"]:
                return self._reply(404, {"detail": "Not Found"})
            return self._reply(200, {"openapi": "3.1.0", "paths": {p: {} for p in st["routes"]}})
        if path in ("/server_info", "/get_server_info") and path in st["routes"]:
            return self._reply(200, {"version": st["sglang_version"]})
        if path == "/model_info":
            return self._reply(200, {"weight_version": st["version"]})
        if path in ("/health", "/health_generate"):
            return self._reply(200, {})
        self._reply(200, {"calls": st["calls"], "updates": st["updates"]})

    def do_OPTIONS(self):
        self._reply(405 if self.path in self.server.state["routes"] else 404, {})

    def do_POST(self):
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        st["calls"].append([self.path, body.get("new_version", body.get("tags"))])
        if self.path == "/generate" and st["version"] in st["down_at_version"]:
            st["down_at_version"].remove(st["version"])
            st["down"] = True  # until a test clears it
        if st["down"]:
            return self._reply(503, {"detail": "down"})
        if self.path not in st["routes"]:
            return self._reply(404, {"detail": "Not Found"})
        done = sum(path == self.path for path, _ in st["calls"]) - 1
        if self.path in st["fail"] or done >= st["fail_after"].get(self.path, float("inf")):
            return self._reply(400, {"success": False, "message": "injected failure"})
        try:
            out = self._handle(st, body)
        except AssertionError as e:
            self._reply(400, {"success": False, "message": str(e)})
            return
        self._reply(200, out if out is not None else {"success": True})

    def _updating(self, st) -> None:
        if set(SESSION_ROUTES) <= st["routes"]:
            assert st["session"], f"{self.path} must run between begin/end"
        else:
            assert st["paused"], f"{self.path} while generating"

    def _handle(self, st, body):
        path = self.path
        if path == "/release_memory_occupation":
            if st["busy"] > 0:
                st["busy"] -= 1
                raise AssertionError("release_memory_occupation should be called only when "
                                     "server is idle.")
            st["released"].update(body.get("tags") or ALL_TAGS)
        elif path == "/resume_memory_occupation":
            tags = set(body.get("tags") or ALL_TAGS)
            assert tags <= st["released"], f"KeyError: {sorted(tags - st['released'])}"
            st["released"] -= tags
        elif path == "/pause_generation":
            st["paused"] = True
        elif path == "/continue_generation":
            st["paused"] = False
        elif path == "/begin_weight_update":
            assert not st["session"], "a weight-update session is already open"
            st["session"] = True
        elif path == "/end_weight_update":
            st["session"] = False
        elif path == "/update_weight_version":
            st["version"] = body["new_version"]
        elif path == "/update_weights_from_disk":
            self._updating(st)
            st["updates"].append(body["model_path"])
        elif path == "/update_weights_from_tensor":
            self._updating(st)
            assert "weights" not in st["released"], "the weights' memory is released"
            if st.get("probe"):
                st["probe"]()
            st["updates"].append([open_entry(e, st["cuda"])
                                  for e in body["serialized_named_tensors"]])
        elif path == "/generate":
            assert not st["released"], f"generate with {sorted(st['released'])} released"
            assert not st["paused"], "generate while paused"
            first = (body.get("input_ids") or [7])[0] % 500 + 3
            item = {"text": "ok", "output_ids": [first, 7],
                    "meta_info": {"output_token_logprobs": [[-0.5, first, None],
                                                            [-1.0, 7, None]],
                                  "finish_reason": {"type": "length", "length": 2},
                                  "prompt_tokens": len(body.get("input_ids") or [1]),
                                  "weight_version": st["version"]}}
            n = body.get("sampling_params", {}).get("n", 1)
            return [item] * n if n > 1 else item
        return None


def open_entry(entry: str, cuda: bool = False) -> dict:
    """What one SGLang TP rank does with its entry: deserialize, rebuild the tensors, copy.
    ``cuda``: read CUDA handles as SGLang does (by GPU UUID); the patch this needs breaks
    pickling CPU tensors in the same process, so the in-process fake leaves it out."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if cuda:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    data = MultiprocessingSerializer.deserialize(entry)
    flat = data["flattened_tensor"]
    bucket = FlattenedTensorBucket(flattened_tensor=flat, metadata=data["metadata"])
    tensors = {n: t.clone() for n, t in bucket.reconstruct_tensors()}
    return {"device": str(flat.device),
            "tensors": {n: float(t.float().mean()) for n, t in tensors.items()}}


def fake_state(busy: int = 0, cuda: bool = False, routes=ROUTES, openapi: bool = True,
               fail=(), sglang_version: str = "0.5.23", fail_after=None,
               down_at_version=None) -> dict:
    """``fail``: routes that always answer 400; ``fail_after``: route -> n, the route answers
    400 from its (n + 1)-th call on; ``down_at_version``: weight versions whose first
    /generate takes the server down (every request 503, /health too) until
    ``state["down"]`` is cleared; ``state["down_polls"]`` counts the GETs it refused."""
    return {"calls": [], "updates": [], "released": set(), "session": False, "paused": False,
            "version": None, "busy": busy, "cuda": cuda, "routes": frozenset(routes),
            "openapi": openapi, "fail": frozenset(fail), "sglang_version": sglang_version,
            "fail_after": dict(fail_after or {}), "down": False, "down_polls": 0,
            "down_at_version": list(down_at_version or ())}


def start_fake(state: dict):
    """A FakeSGLang on a free loopback port, served by a daemon thread: (httpd, url)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    httpd.state = state
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
