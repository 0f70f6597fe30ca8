"""The trainer end to end: TP2 + a real SGLang CPU server, exact resume after SIGKILL,
atomic checkpoints, and clear input errors before any rollout."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "srft_tiny_cpu.yaml")
SMALL = ["train.prompts_per_step=8", "rollout.n_samples=2", "train.micro_batch_size=8",
         "data.max_response_len=32", "logging.tensorboard=false", "logging.progress_bar=false",
         "checkpoint.every=1", "checkpoint.keep=10", "eval.every=0"]
# wall-clock and throughput figures differ between runs; everything else must not
VOLATILE = ("time/", "perf/", "wall_time", "rollout/sync_s", "rollout/sync_gb_per_s",
            "rollout/weight_syncs",  # counts the syncs of this process (restarts on resume)
            "mem/", "offload/seconds")  # process RSS on CPU, copy times


def launch(run_dir, *overrides, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "srft_mcore.training.trainer", "--config", CONFIG,
           f"logging.run_dir={run_dir}", *SMALL, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def attached(url):
    """Overrides that roll out on the session's shared server (tests/conftest.py) instead of
    launching one: disk sync, which leaves no process group behind on the server."""
    return [f'rollout.urls=["{url}"]', "rollout.weight_sync=disk"]


def run(run_dir, *overrides, timeout=900):
    p = launch(run_dir, *overrides)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-6000:]
    return out


def kill_after_checkpoint(run_dir, step, *overrides):
    """Start a run, SIGKILL its launcher's process group once checkpoint ``step`` exists."""
    p = launch(run_dir, *overrides)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.isfile(latest) and open(latest).read().strip() == f"step_{step:06d}":
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the launcher, both ranks and the SGLang server
    p.wait(30)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def final_weights(run_dir):
    from safetensors.torch import load_file

    out = {}
    hf = os.path.join(run_dir, "hf_final")
    for name in sorted(os.listdir(hf)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf, name)))
    return out


@pytest.fixture(scope="module")
def reference_run(once, shared_sglang):
    """An uninterrupted 4-step run (TP2, the shared SGLang server, seeded rollouts),
    checkpointed every step: the run the resume tests compare against and start from. Run
    once per session, whichever worker asks first (tests/conftest.py ``once``)."""
    def build(root):
        with shared_sglang.lease() as url:
            run(str(root), "train.steps=4", *attached(url))
        return str(root)

    return once("trainer_reference_run", build)


@pytest.mark.slow
def test_tp2_run_with_sglang_trains_and_exports(reference_run):
    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["train/sequences"] == 8 * (2 + 1)  # rollouts + one demonstration per prompt
        assert r["loss"] is not None and abs(r["loss"]) < 100
        assert 0 < r["w_sft"] <= 0.5
        # w_RL is the mean over positive rollouts: undefined (null) in a step without one
        assert r["w_rl"] is None or r["w_rl"] >= 0.1
        assert r["rollout/weight_syncs"] >= r["step"]
        assert r["train/skipped"] == 0
        assert 0.1 < r["perf/peak_mem_gb"] < 24  # the ranks' peak RSS on CPU
    peaks = [r["perf/peak_mem_gb"] for r in rows]
    assert peaks == sorted(peaks)  # a running maximum
    assert any(r["w_rl"] is not None for r in rows)
    assert rows[0]["optim/grad_norm"] > 0
    ckpts = os.path.join(reference_run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_000004"
    # the exported policy loads in transformers and differs from the starting weights
    from transformers import AutoModelForCausalLM

    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    trained = AutoModelForCausalLM.from_pretrained(os.path.join(reference_run, "hf_final"))
    base = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR)
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters())]
    assert max(diffs) > 1e-4
    assert os.path.isfile(os.path.join(reference_run, "config.yaml"))


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference_run, tmp_path,
                                                              shared_sglang):
    run_dir = str(tmp_path / "killed")
    with shared_sglang.lease() as url:  # as a fresh server for each run, as in the reference
        kill_after_checkpoint(run_dir, 2, "train.steps=4", *attached(url))
    assert len(metrics(run_dir)) >= 2
    with shared_sglang.lease() as url:
        run(run_dir, "train.steps=4", *attached(url), "--resume")
    want, got = metrics(reference_run), metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        a, b = stable(a), stable(b)
        assert a.keys() == b.keys()
        for k in a:  # null marks a metric undefined in that step (e.g. w_rl, no positives)
            assert (a[k] is None) == (b[k] is None), (a["step"], k)
            if a[k] is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
    wa, wb = final_weights(reference_run), final_weights(run_dir)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _save_then_hang(ckpt_dir, ready_path):
    """One rank: save step 1, then start saving step 2 and stall inside the write."""
    from megatron.core import dist_checkpointing

    from srft_mcore.training import checkpoint as ckpt
    from srft_mcore.doctor.parallel_check import TINY_QWEN2

    model, opt = build_tiny_with_optimizer(TINY_QWEN2)
    ckpt.save_checkpoint(ckpt_dir, 1, model, opt, {"marker": "one"})
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, ready_path + ".pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = dist_checkpointing.save

    def stalling_save(state, path, *a, **k):  # fault injection: write, then never finish
        real_save(state, path, *a, **k)
        open(ready_path, "w").close()
        time.sleep(600)

    dist_checkpointing.save = stalling_save
    ckpt.save_checkpoint(ckpt_dir, 2, model, opt, {"marker": "two"})


def build_tiny_with_optimizer(hf):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model

    init_distributed(1, 1)
    model = build_model(hf, ModelConfig(), ParallelConfig())
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    ddp.zero_grad_buffer()
    opt.step()  # creates the Adam state a training checkpoint holds
    return model, opt


def _load_latest(ckpt_dir):
    from srft_mcore.training import checkpoint as ckpt
    from srft_mcore.doctor.parallel_check import TINY_QWEN2

    model, opt = build_tiny_with_optimizer(TINY_QWEN2)
    path = ckpt.latest_checkpoint(ckpt_dir)
    state = ckpt.load_checkpoint(path, model, opt)
    return os.path.basename(path), state["marker"], {n: p.detach().clone()
                                                     for n, p in model.named_parameters()}


def _load_weights_only(path):
    from srft_mcore.training import checkpoint as ckpt
    from srft_mcore.doctor.parallel_check import TINY_QWEN2

    model, _ = build_tiny_with_optimizer(TINY_QWEN2)
    kind = ckpt.load_model_weights(path, model)
    return kind, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    import multiprocessing as mp

    from srft_mcore.launching.local import spawn_ranks

    from srft_mcore.launching.distributed import free_port

    ckpt_dir, ready = str(tmp_path / "ckpt"), str(tmp_path / "ready")
    ctx = mp.get_context("spawn")
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.update(env, MASTER_PORT=str(free_port()))
    try:
        proc = ctx.Process(target=_save_then_hang, args=(ckpt_dir, ready))
        proc.start()
    finally:
        for k in list(env) + ["MASTER_PORT"]:
            os.environ.pop(k, None)
    deadline = time.monotonic() + 300
    while not os.path.exists(ready) and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.1)
    assert os.path.exists(ready), "the second save never started"
    assert os.path.isdir(os.path.join(ckpt_dir, ".tmp_step_000002"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    name, marker, params = spawn_ranks(_load_latest, 1, (ckpt_dir,))[0]
    assert (name, marker) == ("step_000001", "one")
    saved = torch.load(ready + ".pt")
    for n, p in params.items():
        assert torch.equal(p, saved[n]), n
    # the second stage of SFT->RL loads only the weights of such a checkpoint
    kind, params = spawn_ranks(_load_weights_only, 1, (os.path.join(ckpt_dir, name),))[0]
    assert kind == "trainer checkpoint"
    for n, p in params.items():
        assert torch.equal(p, saved[n]), n
    shutil.rmtree(ckpt_dir)


def single_rank(*overrides, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "srft_mcore.training.trainer", "--config", CONFIG,
                           "parallel.tp=1", *SMALL, *overrides], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_file", "missing_field", "bad_json", "no_template",
                                  "existing_run"])
def test_bad_input_fails_before_any_rollout(tmp_path, case):
    run_dir = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    extra = []
    if case == "missing_file":
        extra.append(f"data.path={tmp_path / 'nope.jsonl'}")
        expect = "nope.jsonl"
    elif case == "missing_field":
        data.write_text('{"prompt": "1+1", "demonstration": "\\\\boxed{2}", "answer": "2"}\n'
                        '{"prompt": "2+2", "answer": "4"}\n')
        extra.append(f"data.path={data}")
        expect = "demonstration"
    elif case == "bad_json":
        data.write_text('{"prompt": "1+1", "demonstration": \n')
        extra.append(f"data.path={data}")
        expect = str(data)
    elif case == "existing_run":  # a fresh run must not replace an earlier run's files
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        expect = "already holds a run"
    else:
        from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

        model = tmp_path / "model"
        shutil.copytree(EMBEDDED_MODEL_DIR, model)
        os.remove(model / "chat_template.jinja")
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
        extra.append(f"model.hf_path={model}")
        expect = "chat template"
    out = single_rank(f"logging.run_dir={run_dir}", *extra)
    assert out.returncode == 2, out.stderr[-3000:]
    assert expect in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (run_dir / "rollout").exists()  # no SGLang server was started
    if case == "existing_run":
        assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'



@pytest.mark.slow
def test_bf16_run_checkpoints_exports_and_resumes_exactly(tmp_path, shared_sglang_bf16):
    """bf16 Megatron params with fp32 master weights, a bf16 SGLang CPU server and bf16
    weight sync, end to end; a SIGKILLed bf16 run resumes into the uninterrupted one."""
    # one request in flight per server: a bf16 CPU server's logits depend on which
    # sequences share its decode batch, so only a fixed batching reproduces them exactly
    over = ("train.steps=2", "model.dtype=bfloat16", "rollout.max_concurrency=1")
    ref = str(tmp_path / "bf16")
    with shared_sglang_bf16.lease() as url:  # each run finds it as freshly started
        run(ref, *over, *attached(url))
    rows = metrics(ref)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] is not None and abs(r["loss"]) < 100 for r in rows)
    assert all(r["train/skipped"] == 0 for r in rows)
    weights = final_weights(ref)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    killed = str(tmp_path / "killed")
    with shared_sglang_bf16.lease() as url:
        kill_after_checkpoint(killed, 1, *over, *attached(url))
    with shared_sglang_bf16.lease() as url:
        run(killed, *over, *attached(url), "--resume")
    for a, b in zip(rows, metrics(killed)):
        a, b = stable(a), stable(b)
        for k in a:
            assert (a[k] is None) == (b[k] is None), (a["step"], k)
            if a[k] is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
    got = final_weights(killed)
    assert all(torch.equal(weights[k], got[k]) for k in weights)


@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_is_a_clear_error_and_changes_nothing(
        reference_run, tmp_path, sglang_url):
    run_dir = str(tmp_path / "damaged")
    shutil.copytree(reference_run, run_dir)  # 4 steps, a checkpoint after each
    ckpts = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(ckpts, "step_000004")  # damaged below

    def snapshot():
        out = {}
        for root, _, files in os.walk(run_dir):
            for name in files:
                p = os.path.join(root, name)
                if "rollout" not in p and "tensorboard" not in p and not name.endswith(".lock"):
                    out[p] = open(p, "rb").read()
        return out

    tensor_files = [os.path.join(latest, "mcore", n) for n in os.listdir(os.path.join(latest,
                                                                                     "mcore"))
                    if n.endswith(".distcp")]
    state_file = os.path.join(latest, "trainer_state.json")
    state = open(state_file).read()
    damages = [("trainer_state.json", lambda: open(state_file, "w").write("{not json")),
               ("mcore/", lambda: [os.truncate(f, os.path.getsize(f) // 2)
                                   for f in tensor_files])]
    for what, damage in damages:
        with open(state_file, "w") as f:  # one damage at a time
            f.write(state)
        damage()
        before = snapshot()
        p = launch(run_dir, "train.steps=5", "checkpoint.export_hf=false",
                   *attached(sglang_url), "--resume")
        out, _ = p.communicate(timeout=600)
        assert p.returncode != 0
        assert f"checkpoint {latest} is damaged: reading {what}" in out, out[-3000:]
        assert "step_000003" in out and "Traceback" not in out.split("is damaged")[0][-200:]
        assert snapshot() == before  # metrics, other checkpoints, latest: untouched
