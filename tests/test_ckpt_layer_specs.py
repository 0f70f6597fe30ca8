"""Megatron checkpoints of either layer spec are read by every reader.

A GPU run builds the transformer-engine (TE) layer spec: its dist checkpoint stores the norms
the TE spec fuses into its linears under ``linear_qkv.layer_norm_weight`` /
``linear_fc1.layer_norm_weight`` and keeps an ``_extra_state`` per TE norm (final, q and k
norms), which the local spec's torch norms do not have. TE does not run on CPU, so its
checkpoint is made from the tiny local-spec model: keys renamed through the bridge's own map
(``name_map.checkpoint_renames``) and the TE norms' ``_extra_state`` given to the norms TE builds
as its own modules, saved by the trainer's ``save_checkpoint`` (model + Adam state) and by
``dist_checkpointing.save`` (model only, as ``srft-convert hf-to-mcore`` writes). A checkpoint
under the local spec's module names (``input_layernorm.weight``) is made the same way.

They convert to the same HF tensors as the local-spec checkpoint (the TE trainer checkpoint
through ``srft-eval``'s conversion, the module-named one through ``srft-convert
mcore-to-hf``); ``model.load_mcore`` loads each into a local-spec model, and a local-spec
checkpoint into a model with the TE norms' extra state.
"""
import copy
import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _named(sharded_state_dict, renames):
    """The sharded state dict with its tensors stored under other checkpoint keys."""
    out = {}
    for name, sh in sharded_state_dict.items():
        if getattr(sh, "key", None) in renames:
            sh = copy.copy(sh)
            sh.key = renames[sh.key]
        out[name] = sh
    return out


class _Saved:
    """What ``save_checkpoint`` saves of a model, under a given naming."""

    def __init__(self, model, renames):
        self.model, self.renames = model, renames

    def sharded_state_dict(self):
        return _named(self.model.sharded_state_dict(), self.renames)


def _give_te_norm_state(model):
    """The norms the TE spec builds as TE modules keep an ``_extra_state`` (as TE's RMSNorm
    does); the input and pre-MLP norms live inside the TE linears, whose extra state the local
    linears have too."""
    for name, module in model.named_modules():
        if name.endswith(("final_layernorm", "q_layernorm", "k_layernorm")):
            module.__class__ = type("TENormLike", (type(module),), {
                "get_extra_state": lambda self: torch.zeros(4, dtype=torch.uint8),
                "set_extra_state": lambda self, state: None})
    return model


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _write_and_load(root, hf_dir):
    """Write the checkpoints; load them with ``load_model_weights`` (``model.load_mcore``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from srft_mcore.training import checkpoint as ckpt
    from srft_mcore.models.bridge import load_hf_into_model
    from srft_mcore.models.name_map import checkpoint_renames
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model

    init_distributed(1, 1)
    hf = load_hf_config(hf_dir)

    def build():
        return build_model(hf, ModelConfig(dtype="float32", transformer_impl="local"),
                           ParallelConfig())

    model = build()
    load_hf_into_model(model, hf_dir, hf)
    want = _params(model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0),
                                 [ddp])
    ddp.zero_grad_buffer()
    opt.step()  # zero gradients: Adam state appears, the weights stay
    to_te = checkpoint_renames(hf, "transformer_engine")
    to_local = checkpoint_renames(hf, "local")
    paths = {"local": ckpt.save_checkpoint(f"{root}/local", 1, model, opt, {}),
             "modnames_model_only": f"{root}/modnames_model_only",
             "te_model_only": f"{root}/te_model_only"}
    os.makedirs(paths["modnames_model_only"])
    dist_checkpointing.save(_named(model.sharded_state_dict(), to_local),
                            paths["modnames_model_only"])
    _give_te_norm_state(model)
    paths["te"] = ckpt.save_checkpoint(f"{root}/te", 1, _Saved(model, to_te), opt, {})
    os.makedirs(paths["te_model_only"])
    dist_checkpointing.save(_named(model.sharded_state_dict(), to_te), paths["te_model_only"])

    keys = {k: sorted(ckpt.stored_keys(os.path.join(p, "mcore") if "step_" in p else p))
            for k, p in paths.items()}
    loads = {}
    for kind, path, te_model in (("te", paths["te"], False),
                                 ("te_model_only", paths["te_model_only"], False),
                                 ("modnames_model_only", paths["modnames_model_only"], False),
                                 ("local_into_te_model", paths["local"], True)):
        fresh = _give_te_norm_state(build()) if te_model else build()
        before = _params(fresh)
        ckpt.load_model_weights(path, fresh, hf)
        got = _params(fresh)
        loads[kind] = {"changed": any(not torch.equal(before[n], want[n]) for n in want),
                       "differ": sorted(n for n in want if not torch.equal(got[n], want[n])),
                       "same_names": sorted(got) == sorted(want)}
    try:
        ckpt.load_model_weights(paths["te"], build(), dict(hf, model_type="llama"))
        loads["wrong_config"] = "loaded"
    except ckpt.CheckpointError as e:
        loads["wrong_config"] = str(e)
    return {"paths": paths, "keys": keys, "loads": loads}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("layer_specs")
    hf_dir = make_tiny_hf_model(str(root / "hf"), "qwen3", num_layers=2, seed=11)
    res = spawn_ranks(_write_and_load, 1, (str(root), hf_dir), timeout_s=300)[0]
    return root, hf_dir, res


def _hf_tensors(d):
    out = {}
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        out.update(load_file(f))
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_the_checkpoints_use_the_names_under_test(written):
    _, _, res = written
    keys = res["keys"]
    for kind in ("local", "te", "te_model_only"):
        assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys[kind]
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys[kind]
        assert "decoder.layers.input_layernorm.weight" not in keys[kind]
    assert "decoder.layers.input_layernorm.weight" in keys["modnames_model_only"]
    assert "decoder.layers.pre_mlp_layernorm.weight" in keys["modnames_model_only"]
    for kind in ("te", "te_model_only"):  # TE's norms keep an extra state; local ones do not
        assert {"decoder.final_layernorm._extra_state",
                "decoder.layers.self_attention.q_layernorm._extra_state"} <= set(keys[kind])
    assert "decoder.final_layernorm._extra_state" not in keys["local"]
    assert any(k.startswith("optimizer.") for k in keys["te"])


def test_eval_and_convert_give_the_local_checkpoints_hf_tensors(written, tmp_path, capsys):
    from srft_mcore.evaluation.models import ModelSource, materialize
    from tools.convert_ckpt.cli import main

    root, hf_dir, res = written
    paths = res["paths"]
    got = {}
    for kind in ("local", "te"):  # srft-eval --model <trainer checkpoint>
        src = ModelSource(kind="trainer", path=paths[kind], hf_dir=hf_dir)
        got[kind] = _hf_tensors(materialize(src, str(tmp_path / f"eval_{kind}")))
    # srft-convert mcore-to-hf of a model-only checkpoint under the local module names, laid
    # out as hf-to-mcore writes it (side files and conversion record as srft-eval stages them)
    ckpt = tmp_path / "modnames_converted"
    shutil.copytree(paths["modnames_model_only"], ckpt)
    staged = tmp_path / "eval_te" / "mcore_staged"
    shutil.copytree(staged / "hf", ckpt / "hf")
    shutil.copy(staged / "srft_bridge.json", ckpt)
    capsys.readouterr()
    assert main(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["checkpoint_naming"] == "local"
    got["cli_modnames"] = _hf_tensors(tmp_path / "cli")
    _same(got["local"], _hf_tensors(hf_dir))
    for kind in ("te", "cli_modnames"):
        _same(got[kind], got["local"])

    # a checkpoint that fits neither naming: one error, before any rank starts
    (ckpt / "hf" / "config.json").write_text(json.dumps(
        dict(json.loads((ckpt / "hf" / "config.json").read_text()), model_type="llama")))
    assert main(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "match neither the transformer-engine nor the local layer-spec names" in err
    assert "unexpected keys ['decoder.layers.self_attention.k_layernorm.weight'" in err
    assert "expected" in err and not (tmp_path / "bad").exists()


def test_load_mcore_reads_either_naming_into_either_model(written):
    _, _, res = written
    loads = res["loads"]
    for kind in ("te", "te_model_only", "modnames_model_only", "local_into_te_model"):
        r = loads[kind]
        assert r["changed"] and r["same_names"], (kind, r)  # a fresh model, then loaded
        assert r["differ"] == [], (kind, r)
    assert "match neither" in loads["wrong_config"]
    assert "q_layernorm" in loads["wrong_config"]
