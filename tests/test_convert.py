"""srft-convert end to end: HF -> Megatron dist checkpoint (TP2xPP2) -> HF is bit-exact,
loads with transformers and with the SGLang CPU server, which generate the same greedy
tokens; a failure mid-way leaves no output behind."""
import glob
import json
import os
import subprocess
import sys

import pytest
import requests
import torch
from safetensors.torch import load_file

from srft_mcore.models.tiny import make_tiny_hf_model

pytestmark = pytest.mark.slow


def convert(*args):
    out = subprocess.run([sys.executable, "-m", "tools.convert_ckpt.cli", *args],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout, out.stderr


def convert_in_process(*args):
    """``convert`` through main() in this process (tests/cli_main.py): seconds faster; the
    command's own exit status is checked by test_failure_midway_leaves_no_output."""
    from cli_main import run_main
    from tools.convert_ckpt.cli import main

    return run_main(main, args)


def read_all(d):
    got = {}
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        got.update(load_file(f))
    return got


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src = make_tiny_hf_model(str(root / "src"), "qwen2", tied=True, seed=3)
    ckpt, back = str(root / "mcore"), str(root / "back")
    rc, out, err = convert_in_process("hf-to-mcore", "--hf", src, "--out", ckpt, "--tp", "2",
                                      "--pp", "2")
    assert rc == 0, err[-3000:]
    rc, out, err = convert_in_process("mcore-to-hf", "--ckpt", ckpt, "--out", back,
                                      "--max-shard-size", "200KB")
    assert rc == 0, err[-3000:]
    return src, ckpt, back, json.loads(out.strip().splitlines()[-1])


def test_round_trip_is_bit_exact(round_trip):
    src, ckpt, back, summary = round_trip
    meta = json.load(open(os.path.join(ckpt, "srft_bridge.json")))
    vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
    assert (meta["tp"], meta["pp"], meta["vocab_size"]) == (2, 2, vocab)
    assert meta["padded_vocab_size"] % 256 == 0 and meta["padded_vocab_size"] >= vocab
    assert os.path.isfile(os.path.join(ckpt, "hf", "tokenizer.json"))
    a, b = read_all(src), read_all(back)
    assert a.keys() == b.keys() and "lm_head.weight" not in b  # tied
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    assert summary["shards"] > 1 and len(set(index["weight_map"].values())) == summary["shards"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(back, f)), f
    assert not [p for p in os.listdir(os.path.dirname(back)) if ".tmp-" in p]


def test_export_loads_in_transformers_and_sglang_greedy_matches(round_trip):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srft_mcore.rollout.server import SGLangServer

    src, _, back, _ = round_trip
    tok = AutoTokenizer.from_pretrained(back)
    prompt = tok("12 + 7 = ")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    x = torch.tensor([prompt])
    assert torch.equal(model(x).logits, orig(x).logits)
    with torch.no_grad():
        hf_tokens = model.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                   pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    server = SGLangServer.launch(back, startup_timeout_s=240)
    try:
        r = requests.post(server.url + "/generate", timeout=120, json={
            "input_ids": prompt,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}})
        r.raise_for_status()
        sgl_tokens = r.json()["meta_info"].get("output_ids") or r.json()["output_ids"]
    finally:
        server.stop()
    assert not server.is_alive()
    assert sgl_tokens == hf_tokens


def test_failure_midway_leaves_no_output(round_trip, tmp_path):
    import shutil

    _, ckpt, _, _ = round_trip
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    for f in glob.glob(str(broken / "__1_*.distcp")):
        os.truncate(f, 64)
    out = tmp_path / "out"
    rc, _, err = convert("mcore-to-hf", "--ckpt", str(broken), "--out", str(out))
    assert rc == 1 and "error" in err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
