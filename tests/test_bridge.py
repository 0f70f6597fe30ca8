"""Bridge unit tests (one process, no ranks): name maps, per-rank slicing, export transforms,
bucketing, the streaming safetensors writer and bad-input errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from srft_mcore.models import bridge, name_map
from srft_mcore.models import UnsupportedArchitecture, get_architecture
from srft_mcore.models.sharding import split_for_rank
from tools.convert_ckpt.safetensors_out import StreamingSafetensorsWriter

QWEN = dict(model_type="qwen2", vocab_size=300, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
LLAMA = dict(QWEN, model_type="llama", tie_word_embeddings=True)

# the Megatron TP split dim of each layout (sharding.split_for_rank convention)
SPLIT_DIM = {"replicated": None, "vocab": 0, "row": 1, "qkv": 0, "gate_up": 0}


def random_hf(hf, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in name_map.expected_hf_shapes(hf).items()}


def test_name_maps_local_and_te():
    maps = name_map.tensor_maps(QWEN)
    assert maps["decoder.layers.{i}.self_attention.linear_qkv.bias"].hf[0] == \
        "model.layers.{i}.self_attn.q_proj.bias"
    te = name_map.mcore_names(QWEN, te=True)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any(n.endswith("input_layernorm.weight") for n in te)
    tm, layer = name_map.lookup(QWEN,
                                "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight")
    assert name_map.hf_names(tm, layer) == ["model.layers.1.input_layernorm.weight"]
    tm, layer = name_map.lookup(QWEN, "decoder.layers.0.mlp.linear_fc1.layer_norm_weight", te=True)
    assert name_map.hf_names(tm, layer) == ["model.layers.0.post_attention_layernorm.weight"]
    # Llama: no qkv bias by default; tied: no lm_head, and the last stage's output copy
    # reads the embedding
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in name_map.mcore_names(LLAMA)
    assert "lm_head.weight" not in name_map.expected_hf_shapes(LLAMA)
    assert "lm_head.weight" in name_map.expected_hf_shapes(QWEN)
    tm, _ = name_map.lookup(LLAMA, "output_layer.weight")
    assert tm.hf == ("model.embed_tokens.weight",)
    with pytest.raises(name_map.BridgeError, match="no HF counterpart"):
        name_map.lookup(QWEN, "decoder.layers.0.self_attention.q_layernorm.weight")


QWEN3 = dict(QWEN, model_type="qwen3", head_dim=8)


def test_checkpoint_naming_of_either_layer_spec():
    """Dist-checkpoint keys (no layer number) of both namings come from the family map; a
    checkpoint is told apart by its keys, optimizer state and ``_extra_state`` ignored."""
    te = name_map.checkpoint_names(QWEN3, "transformer_engine")
    local = name_map.checkpoint_names(QWEN3, "local")
    assert set(te) ^ set(local) == {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.input_layernorm.weight", "decoder.layers.pre_mlp_layernorm.weight"}
    assert te["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] is \
        local["decoder.layers.input_layernorm.weight"]
    assert name_map.checkpoint_key("decoder.layers.{i}.mlp.linear_fc2.weight") == \
        name_map.checkpoint_key("decoder.layers.17.mlp.linear_fc2.weight") == \
        "decoder.layers.mlp.linear_fc2.weight"
    others = {"optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight",
              "decoder.layers.self_attention.linear_qkv._extra_state",
              "decoder.final_layernorm._extra_state"}
    assert name_map.checkpoint_naming(QWEN3, set(te) | others) == "transformer_engine"
    assert name_map.checkpoint_naming(QWEN3, set(local) | others) == "local"
    # every key a reader may ask for maps to the key the checkpoint stores
    for naming, stored in (("transformer_engine", te), ("local", local)):
        renames = name_map.checkpoint_renames(QWEN3, naming)
        for key in set(te) | set(local):
            assert renames.get(key, key) in stored, (naming, key)


def test_checkpoint_naming_error_names_unexpected_and_expected_keys():
    te = set(name_map.checkpoint_names(QWEN3, "transformer_engine"))
    mixed = (te - {"decoder.layers.mlp.linear_fc1.layer_norm_weight"}) | \
        {"decoder.layers.pre_mlp_layernorm.weight"}  # half one naming, half the other
    with pytest.raises(name_map.BridgeError) as e:
        name_map.checkpoint_naming(QWEN3, mixed, where="checkpoint '/ck'")
    msg = str(e.value)
    assert msg.startswith("checkpoint '/ck': ") and "neither" in msg
    assert "1 unexpected keys ['decoder.layers.pre_mlp_layernorm.weight']" in msg
    assert "1 missing keys ['decoder.layers.mlp.linear_fc1.layer_norm_weight']" in msg
    assert f"expected {len(te)} keys" in msg
    # a checkpoint of another family (Qwen3's q/k norms, no qkv bias under a Qwen2 config)
    with pytest.raises(name_map.BridgeError, match=r"qwen2 map.*q_layernorm.*linear_qkv\.bias"):
        name_map.checkpoint_naming(QWEN, te)


def _fake_gpt(hf, te, tensors, padded=384):
    """A module tree with GPTModel's parameter names of one layer spec (TE does not run on
    CPU), holding the TP1 tensors made from ``tensors``."""
    dims = name_map.Dims.from_hf(hf)
    root = torch.nn.Module()
    root.vocab_size = padded
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(dims.layers))
    for i, layer in enumerate(root.decoder.layers):
        layer.layer_number = i + 1
    src = bridge.TensorSource(tensors)
    for name in name_map.mcore_names(hf, te=te):
        tm, layer = name_map.lookup(hf, name, te=te)
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                setattr(module, part, torch.nn.Module())
            module = getattr(module, part)
        full = bridge.hf_slice_for_rank(tm, layer, src, dims, padded, 1, 0)
        module.register_parameter(leaf, torch.nn.Parameter(full))
    return root


@pytest.mark.parametrize("hf", [QWEN, QWEN3], ids=["qwen2", "qwen3"])
def test_hf_export_and_load_of_either_layer_spec(hf, tmp_path):
    """The HF export and HF loading map a model of either spec (its live parameter names)."""
    tensors = random_hf(hf)
    write_hf(tmp_path, hf, tensors)
    for te in (False, True):
        model = _fake_gpt(hf, te, tensors)
        names = dict(model.named_parameters())
        assert ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in names) == te
        assert ("decoder.layers.1.input_layernorm.weight" in names) != te
        got = dict(bridge.export_hf_weights(model, hf))
        assert got.keys() == tensors.keys()
        assert all(torch.equal(got[n], t) for n, t in tensors.items())
        want = {n: p.detach().clone() for n, p in names.items()}
        with torch.no_grad():
            for p in names.values():
                p.zero_()
        bridge.load_hf_into_model(model, str(tmp_path), hf)
        assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="llama, qwen2"):
        get_architecture({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})


@pytest.mark.parametrize("hf", [QWEN, LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
def test_slices_match_megatron_split_and_export_inverts(hf, tp):
    tensors = random_hf(hf)
    src = bridge.TensorSource(tensors)
    dims = name_map.Dims.from_hf(hf)
    padded = 512 if tp == 2 else 384  # Megatron: multiple of 128 * tp
    for name in name_map.mcore_names(hf):
        tm, layer = name_map.lookup(hf, name)
        full = bridge.hf_slice_for_rank(tm, layer, src, dims, padded, 1, 0)
        # each rank's direct slice equals Megatron's split of the full TP1 tensor
        for r in range(tp):
            shard = bridge.hf_slice_for_rank(tm, layer, src, dims, padded, tp, r)
            want = split_for_rank(full, name, SPLIT_DIM[tm.layout], tp, r)
            assert torch.equal(shard, want), (name, r)
        if tm.layout == "vocab":
            assert full.shape[0] == padded and not full[dims.vocab:].any()
        # export is the exact inverse (vocab padding trimmed)
        for hf_name, t in bridge.mcore_to_hf(tm, layer, full, dims):
            assert torch.equal(t, tensors[hf_name]), hf_name


def test_qkv_is_interleaved_per_group():
    hf = dict(QWEN, hidden_size=8, num_attention_heads=4, num_key_value_heads=2)
    d = name_map.Dims.from_hf(hf)  # head_dim 2, 2 q heads per group
    q = torch.arange(8.0).reshape(8, 1).expand(8, 8)
    k, v = 100 + torch.arange(4.0).reshape(4, 1).expand(4, 8), 200 + torch.arange(4.0).reshape(4, 1).expand(4, 8)
    src = bridge.TensorSource({"model.layers.0.self_attn.q_proj.weight": q,
                               "model.layers.0.self_attn.k_proj.weight": k,
                               "model.layers.0.self_attn.v_proj.weight": v})
    tm, layer = name_map.lookup(hf, "decoder.layers.0.self_attention.linear_qkv.weight")
    full = bridge.hf_slice_for_rank(tm, layer, src, d, 0, 1, 0)
    assert full[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


def test_bucketize():
    ts = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 1, 1])]
    buckets = list(bridge.bucketize(iter(ts), bucket_bytes=80))  # fp32: 40, 40, 120, 20, 4, 4
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in ts]
    with pytest.raises(ValueError):
        list(bridge.bucketize(iter(ts), 0))


def test_streaming_writer_shards_and_index(tmp_path):
    tensors = {f"w{i}": torch.randn(4, 8).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(5)}
    plan = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    w = StreamingSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=200)
    for n in reversed(list(tensors)):  # any order
        w.write(n, tensors[n])
    with pytest.raises(name_map.BridgeError, match=r"w0.*\(3, 8\).*\(4, 8\)"):
        w.write("w0", torch.zeros(3, 8))
    w.close()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    got = {}
    for f in files:
        got.update(load_file(tmp_path / f))
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())


def write_hf(tmp_path, hf, tensors, split=False):
    os.makedirs(tmp_path, exist_ok=True)
    json.dump(hf, open(tmp_path / "config.json", "w"))
    if not split:
        save_file(tensors, tmp_path / "model.safetensors")
        return
    names = list(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in parts.items():
        save_file({n: tensors[n] for n in ns}, tmp_path / f)
    json.dump({"weight_map": {n: f for f, ns in parts.items() for n in ns}},
              open(tmp_path / "model.safetensors.index.json", "w"))


def test_hf_checkpoint_errors(tmp_path):
    tensors = random_hf(QWEN)
    ok = tmp_path / "ok"
    write_hf(ok, QWEN, tensors, split=True)
    ck = bridge.HFCheckpoint(str(ok))
    assert torch.equal(ck.read("model.norm.weight", (slice(0, 3),)), tensors["model.norm.weight"][:3])

    missing = tmp_path / "missing"
    write_hf(missing, QWEN, tensors, split=True)
    os.remove(missing / "model-00002-of-00002.safetensors")
    with pytest.raises(name_map.BridgeError, match="model-00002-of-00002.safetensors.*missing"):
        bridge.HFCheckpoint(str(missing))

    trunc = tmp_path / "trunc"
    write_hf(trunc, QWEN, tensors)
    path = trunc / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(name_map.BridgeError, match="truncated"):
        bridge.HFCheckpoint(str(trunc))

    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    shape = tmp_path / "shape"
    write_hf(shape, QWEN, bad)
    with pytest.raises(name_map.BridgeError,
                       match=r"model.layers.1.mlp.up_proj.weight.*\(40, 32\).*\(48, 32\)"):
        bridge.HFCheckpoint(str(shape))

    absent = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    lack = tmp_path / "lack"
    write_hf(lack, QWEN, absent)
    with pytest.raises(name_map.BridgeError, match="lm_head.weight"):
        bridge.HFCheckpoint(str(lack))

    ints = dict(tensors, **{"model.norm.weight": torch.zeros(32, dtype=torch.int64)})
    idt = tmp_path / "ints"
    write_hf(idt, QWEN, ints)
    with pytest.raises(name_map.BridgeError, match="model.norm.weight.*int|I64"):
        bridge.HFCheckpoint(str(idt))


def test_check_tp_names_heads():
    with pytest.raises(name_map.BridgeError, match="tensor parallel size 3 does not divide"):
        name_map.check_tp(QWEN, 3)
    name_map.check_tp(QWEN, 2)


def test_convert_cli_refuses_bad_input(tmp_path, capsys):
    from tools.convert_ckpt.cli import main

    hf_dir = tmp_path / "hf"
    write_hf(hf_dir, QWEN, random_hf(QWEN))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(busy)]) == 1
    assert "not empty" in capsys.readouterr().err and (busy / "keep.txt").exists()
    assert main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "o"),
                 "--tp", "3"]) == 1
    assert "does not divide" in capsys.readouterr().err
    other = tmp_path / "other"
    write_hf(other, dict(QWEN, model_type="gpt_neox"), {})
    assert main(["hf-to-mcore", "--hf", str(other), "--out", str(tmp_path / "o")]) == 1
    assert "Supported model types: llama, qwen2" in capsys.readouterr().err
    assert main(["mcore-to-hf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "o")]) == 1
    assert "not a checkpoint written by" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
