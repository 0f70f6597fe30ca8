"""Qwen3 dense: registry entry, HF <-> Megatron table (q/k norms head_dim wide, no qkv bias),
TransformerConfig (qk_layernorm, kv_channels = head_dim) and layer spec; logit parity vs
transformers at TP1, TP2, PP2 and TP2xPP2 on gloo with the bridge round trip; the
``srft-convert`` round trip bit-exact and SGLang CPU greedy tokens equal to transformers.

The tiny models have head_dim 32 while hidden_size / num_attention_heads is 16, and GQA
(4 query heads, 2 key/value groups).
"""
import glob
import json
import os

import pytest
import requests
import torch
from safetensors.torch import load_file

from srft_mcore.models import bridge, name_map
from srft_mcore.launching.local import spawn_ranks
from srft_mcore.models import get_architecture, padded_vocab_size
from srft_mcore.models.tiny import make_tiny_hf_model
from srft_mcore.doctor.parity import reference_logits, run_rank, sample_tokens
from test_convert import convert_in_process

TOL = 1e-4
HEAD_DIM = 32  # != hidden_size // num_attention_heads (64 // 4)
QWEN3 = dict(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=HEAD_DIM, tie_word_embeddings=False, rms_norm_eps=1e-6)
MODELS = {
    "qwen3_untied_padded": dict(arch="qwen3", tied=False, vocab_size=300, head_dim=HEAD_DIM),
    "qwen3_tied": dict(arch="qwen3", tied=True, rope_theta=1e6, head_dim=HEAD_DIM),
}


# --------------------------------------------------------------------------- no ranks
def test_registry_and_name_map():
    arch = get_architecture(QWEN3)
    assert arch.hf_class == "Qwen3ForCausalLM" and arch.qk_norm
    assert not arch.qkv_bias(QWEN3) and arch.qkv_bias(dict(QWEN3, attention_bias=True))
    assert not get_architecture(dict(QWEN3, model_type="qwen2")).qk_norm
    names = name_map.mcore_names(QWEN3)
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in names
    assert "decoder.layers.1.self_attention.k_layernorm.weight" in names
    assert not any(n.endswith("linear_qkv.bias") for n in names)
    # the q/k norm names are the same under the Transformer Engine spec
    te = name_map.mcore_names(QWEN3, te=True)
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in te
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    tm, layer = name_map.lookup(QWEN3, "decoder.layers.1.self_attention.k_layernorm.weight")
    assert tm.layout == "replicated"
    assert name_map.hf_names(tm, layer) == ["model.layers.1.self_attn.k_norm.weight"]
    shapes = name_map.expected_hf_shapes(QWEN3)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (HEAD_DIM,)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (HEAD_DIM,)
    assert shapes["model.layers.0.input_layernorm.weight"] == (64,)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * HEAD_DIM, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * HEAD_DIM, 64)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 4 * HEAD_DIM)
    assert "lm_head.weight" in shapes
    assert "lm_head.weight" not in name_map.expected_hf_shapes(dict(QWEN3,
                                                                    tie_word_embeddings=True))
    # the Qwen2 map has no q/k norms
    with pytest.raises(name_map.BridgeError, match="no HF counterpart"):
        name_map.lookup(dict(QWEN3, model_type="qwen2"),
                        "decoder.layers.0.self_attention.q_layernorm.weight")


@pytest.mark.parametrize("tp", [1, 2])
def test_slices_and_export_invert(tp):
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g)
               for n, s in name_map.expected_hf_shapes(QWEN3).items()}
    src, dims = bridge.TensorSource(tensors), name_map.Dims.from_hf(QWEN3)
    assert dims.head_dim == HEAD_DIM
    padded = padded_vocab_size(QWEN3["vocab_size"], 128, tp)
    for name in name_map.mcore_names(QWEN3):
        tm, layer = name_map.lookup(QWEN3, name)
        full = bridge.hf_slice_for_rank(tm, layer, src, dims, padded, 1, 0)
        if tm.layout == "replicated":  # every rank reads the whole norm
            assert torch.equal(bridge.hf_slice_for_rank(tm, layer, src, dims, padded, tp, tp - 1),
                               full)
        for hf_name, t in bridge.mcore_to_hf(tm, layer, full, dims):
            assert torch.equal(t, tensors[hf_name]), hf_name


def test_transformer_config_and_local_spec(monkeypatch):
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.models.builder import (Kernels, choose_build, layer_spec,
                                           make_transformer_config)

    # the block spec counts this stage's layers from the parallel state: no ranks here
    monkeypatch.setattr(transformer_block, "get_num_layers_to_build", lambda cfg: cfg.num_layers)
    choice = choose_build("local", Kernels())
    par = ParallelConfig(tp=1, pp=1)
    cfg = make_transformer_config(QWEN3, ModelConfig(dtype="float32", transformer_impl="local"),
                                  par, choice)
    assert cfg.qk_layernorm and cfg.kv_channels == HEAD_DIM and not cfg.add_qkv_bias
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    attn = layer_spec(choice, cfg).layer_specs[0].submodules.self_attention.submodules
    assert attn.q_layernorm is not IdentityOp and attn.k_layernorm is not IdentityOp
    assert attn.q_layernorm is attn.k_layernorm
    qwen2 = make_transformer_config(dict(QWEN3, model_type="qwen2", head_dim=None),
                                    ModelConfig(dtype="float32", transformer_impl="local"),
                                    par, choice)
    assert not qwen2.qk_layernorm and qwen2.kv_channels == 16 and qwen2.add_qkv_bias
    attn2 = layer_spec(choice, qwen2).layer_specs[0].submodules.self_attention.submodules
    assert attn2.q_layernorm is IdentityOp


# --------------------------------------------------------------------------- gloo ranks
def _built_norms_rank(hf_dir):
    """The q/k norm modules of a model built through the builder (local spec)."""
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model

    init_distributed(tp=1, pp=1)
    model = build_model(load_hf_config(hf_dir), ModelConfig(dtype="float32",
                                                             transformer_impl="local"),
                        ParallelConfig(tp=1, pp=1))
    attn = model.decoder.layers[0].self_attention
    params = {n: tuple(p.shape) for n, p in model.named_parameters() if "layernorm" in n}
    return {"q": type(attn.q_layernorm).__name__, "k": type(attn.k_layernorm).__name__,
            "q_inner": type(getattr(attn.q_layernorm, "norm", attn.q_layernorm)).__name__,
            "eps": getattr(attn.q_layernorm, "eps", None), "params": params}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_parity")
    out = []
    for i, (name, kw) in enumerate(MODELS.items()):
        d = make_tiny_hf_model(str(root / name), seed=10 + i, **kw)
        vocab = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
        tokens = sample_tokens(vocab, batch=2, seq_len=12, seed=i)
        ref = str(root / f"{name}_ref.pt")
        torch.save({"tokens": tokens, "logits": reference_logits(d, tokens)}, ref)
        out.append({"hf_dir": d, "ref": ref, "name": name})
    return out


@pytest.mark.slow
def test_built_model_has_rms_qk_norms(cases):
    res = spawn_ranks(_built_norms_rank, 1, (cases[0]["hf_dir"],), timeout_s=300)[0]
    assert res["q"] == res["k"] != "IdentityOp", res
    assert "RMSNorm" in res["q"] + res["q_inner"], res
    assert res["params"]["decoder.layers.0.self_attention.q_layernorm.weight"] == (HEAD_DIM,)
    assert res["params"]["decoder.layers.1.self_attention.k_layernorm.weight"] == (HEAD_DIM,)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,split", [(1, 1, None), (2, 1, None), (1, 2, [1, 3]), (2, 2, None)],
                         ids=["tp1", "tp2", "pp2_uneven", "tp2pp2"])
def test_logit_parity_and_round_trip(cases, tp, pp, split):
    round_trip = tp * pp == 4
    results = spawn_ranks(run_rank, tp * pp,
                          (tp, pp, [{"hf_dir": c["hf_dir"], "ref": c["ref"]} for c in cases],
                           split, round_trip), timeout_s=300)
    for case, res in zip(cases, results[0]):
        print(f"{case['name']} tp{tp} pp{pp}: max_abs_diff {res['max_abs_diff']:.3g}")
        assert res["max_abs_diff"] <= TOL, (case["name"], res)
        assert res["padded_logits_max"] == 0.0, (case["name"], res)
        if round_trip:
            assert res["round_trip_mismatches"] == [], (case["name"], res)
            assert res["round_trip_missing"] == [], (case["name"], res)
            assert res["round_trip_tensors"] > 0
    assert results[0][0]["padded_vocab_size"] > results[0][0]["vocab_size"]


# --------------------------------------------------------------------------- srft-convert + SGLang
def _read_all(d):
    got = {}
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        got.update(load_file(f))
    return got


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_convert")
    src = make_tiny_hf_model(str(root / "src"), "qwen3", tied=True, head_dim=HEAD_DIM, seed=7)
    ckpt, back = str(root / "mcore"), str(root / "back")
    rc, _, err = convert_in_process("hf-to-mcore", "--hf", src, "--out", ckpt, "--tp", "2",
                                    "--pp", "2")
    assert rc == 0, err[-3000:]
    rc, _, err = convert_in_process("mcore-to-hf", "--ckpt", ckpt, "--out", back)
    assert rc == 0, err[-3000:]
    return src, ckpt, back


@pytest.mark.slow
def test_convert_round_trip_is_bit_exact(converted):
    src, ckpt, back = converted
    meta = json.load(open(os.path.join(ckpt, "srft_bridge.json")))
    assert meta["model_type"] == "qwen3" and (meta["tp"], meta["pp"]) == (2, 2)
    a, b = _read_all(src), _read_all(back)
    assert a.keys() == b.keys() and "lm_head.weight" not in b  # tied
    assert "model.layers.3.self_attn.q_norm.weight" in b
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == HEAD_DIM


@pytest.mark.slow
def test_sglang_greedy_matches_transformers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srft_mcore.rollout.server import SGLangServer

    _, _, back = converted
    tok = AutoTokenizer.from_pretrained(back)
    prompt = tok("12 + 7 = ")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   min_new_tokens=8, pad_token_id=tok.pad_token_id
                                   )[0, len(prompt):].tolist()
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
    print(f"greedy tokens: transformers {hf_tokens} sglang {sgl_tokens}")
    assert sgl_tokens == hf_tokens
