import contextlib
import fcntl
import os
import pickle

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# SGLang treats the SIGTERM that stops a server as a child crash and sleeps 5 s before
# its py-spy / CUDA-coredump diagnostics (nothing to dump on CPU): every stop waited for it
os.environ.setdefault("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "0")
os.environ.setdefault("SGLANG_CUDA_COREDUMP_BEFORE_CRASH", "0")


def pytest_collection_modifyitems(config, items):
    # first, side by side, the tests that read a result built once per session (``once``
    # below): xdist's first batch for one worker (pytest.ini: -n 2) holds them all, so no
    # worker sits waiting for the other's build; then the files with long tests, so that the
    # workers end together instead of one running a long test alone at the end
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: ("once" not in item.fixturenames, item.path not in slow_files))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NCCL / CUDA kernels); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- built once per session
@pytest.fixture(scope="session")
def once(tmp_path_factory, worker_id):
    """``once(name, build)``: ``build(directory)``'s result, built by the first worker that
    asks and read back by every other (pytest-xdist workers share the session's temporary
    root). For the costly references several tests compare against: a reference run, a
    weight-sync job, an evaluation pass. ``build`` returns something that pickles."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker_id != "master" else root

    def get(name: str, build):
        directory, result = root / f"once_{name}", root / f"once_{name}.pkl"
        with open(root / f"once_{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the first build
            if result.exists():
                return pickle.loads(result.read_bytes())
            directory.mkdir(exist_ok=True)
            value = build(directory)
            result.write_bytes(pickle.dumps(value))
            return value

    return get


# --------------------------------------------------------------------------- shared SGLang server
class SharedServer:
    """One SGLang CPU server of the embedded model for the whole session (a start costs ~25 s
    of two cores). Started on first use; a test that kills it gets a new one. ``lease()``
    hands out its URL and afterwards undoes what the user left behind (synced weights, a
    weight version, a scheduler paused by a killed trainer): every user finds it as freshly
    started."""

    def __init__(self, log_dir, dtype: str = "float32"):
        self.log_dir, self.dtype = log_dir, dtype
        self.starts, self.server, self.initial_version = 0, None, None

    def _server(self):
        import requests

        from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR
        from srft_mcore.rollout.server import SGLangServer

        if self.server is None or not self.server.healthy():
            if self.server is not None:
                self.server.stop()
            self.starts += 1
            self.server = SGLangServer.launch(
                EMBEDDED_MODEL_DIR, extra_args=["--dtype", self.dtype],
                log_path=str(self.log_dir / f"sglang_{self.starts}.log"))
            self.initial_version = requests.get(self.server.url + "/model_info",
                                                timeout=30).json().get("weight_version")
        return self.server

    @contextlib.contextmanager
    def lease(self):
        import requests

        from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

        server = self._server()
        try:
            yield server.url
        finally:
            if server.healthy():  # else the next lease starts a new one
                for path, body in (
                        ("/continue_generation", {}),
                        ("/update_weights_from_disk", {"model_path": EMBEDDED_MODEL_DIR}),
                        ("/update_weight_version", {"new_version": self.initial_version,
                                                    "abort_all_requests": False}),
                        ("/flush_cache", {})):
                    r = requests.post(server.url + path, json=body, timeout=120)
                    assert r.status_code == 200, f"resetting the shared server: {path}: {r.text}"

    def stop(self):
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def shared_sglang(tmp_path_factory):
    shared = SharedServer(tmp_path_factory.mktemp("shared_sglang"))
    yield shared
    shared.stop()


@pytest.fixture(scope="session")
def shared_sglang_bf16(tmp_path_factory):
    """The same, serving bfloat16 (the bf16 end-to-end test's runs)."""
    shared = SharedServer(tmp_path_factory.mktemp("shared_sglang_bf16"), dtype="bfloat16")
    yield shared
    shared.stop()


@pytest.fixture
def sglang_url(shared_sglang):
    """The shared server's URL for one test (see :class:`SharedServer`)."""
    with shared_sglang.lease() as url:
        yield url


@pytest.fixture
def fakes():
    """``fakes(state)``: the URL of a FakeSGLang (tests/fake_http.py) serving ``state``;
    every one started is shut down after the test."""
    from fake_http import start_fake

    started = []

    def start(state):
        httpd, url = start_fake(state)
        started.append(httpd)
        return url

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()

