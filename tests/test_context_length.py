"""Prompt + response lengths against the model's context: a clear config error before anything
starts, and the model.rope_theta / model.max_position_embeddings overrides reaching both the
trainer's model and the SGLang server (``--context-length``, ``--json-model-override-args``)."""
import json
import os
import shutil

import pytest
import requests
import torch

from srft_mcore.config import ConfigError, load_config, validate
from srft_mcore.config.hf_config import context_limit, with_overrides
from srft_mcore.rollout.server import (SGLangServer, context_server_args, model_override_args)

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "examples", "configs", "srft_qwen7b_tp2pp1.yaml")
# Qwen2.5-Math-7B's config.json, the fields that matter here
QWEN25_MATH_7B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064,
                      hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                      rope_theta=10000.0, max_position_embeddings=4096, rope_scaling=None,
                      tie_word_embeddings=False)


def recipe(*overrides):
    return load_config(RECIPE, ["model.hf_path=/models/qwen", *overrides])


def test_stock_7b_context_is_refused_naming_both_numbers_and_the_fix():
    cfg = recipe("model.rope_theta=null", "model.max_position_embeddings=null")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4, hf_config=QWEN25_MATH_7B)
    msg = str(err.value)
    assert "1024 + 8192 = 9216 tokens" in msg and "context is 4096 tokens" in msg
    assert "max_position_embeddings=4096 in the model's config.json" in msg
    assert "Fix: raise it with model.max_position_embeddings" in msg
    assert "data.max_response_len" in msg


def test_the_7b_recipe_fits_with_its_rope_setting():
    cfg = validate(recipe(), world_size=4, hf_config=QWEN25_MATH_7B)
    assert (cfg.model.rope_theta, cfg.model.max_position_embeddings) == (40000.0, 16384)
    # shortening the data instead works as well
    validate(recipe("model.rope_theta=null", "model.max_position_embeddings=null",
                    "data.max_response_len=3072"), world_size=4, hf_config=QWEN25_MATH_7B)


def test_an_override_that_is_still_too_short_names_the_override():
    with pytest.raises(ConfigError, match=r"context is 8192 tokens \(model\."
                                          r"max_position_embeddings=8192\)"):
        validate(recipe("model.max_position_embeddings=8192"), hf_config=QWEN25_MATH_7B)


@pytest.mark.parametrize("key, value", [("model.rope_theta", 0), ("model.rope_theta", -5.0),
                                        ("model.max_position_embeddings", 0)])
def test_bad_override_values_fail(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value!r}.*Fix:"):
        validate(recipe(f"{key}={value}"))


def test_context_limit_counts_rope_scaling_as_sglang_does():
    assert context_limit({"max_position_embeddings": 4096}) == 4096
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert context_limit(linear) == 16384
    # llama3 (and yarn with original_max_position_embeddings) already count the scaling
    llama3 = {"max_position_embeddings": 131072,
              "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}
    assert context_limit(llama3) == 131072
    assert context_limit({"num_hidden_layers": 2}) is None


def test_server_command_line_carries_context_and_rope():
    cfg = recipe()
    args = context_server_args(cfg, QWEN25_MATH_7B, hf_major=5)
    assert args[:2] == ["--context-length", "9218"]  # + SGLang's 2 reserved tokens
    override = json.loads(args[args.index("--json-model-override-args") + 1])
    # transformers 5 reads the base from rope_parameters; 4.x from the top level
    assert override == {"max_position_embeddings": 16384, "rope_theta": 40000.0,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}}
    v4 = json.loads(context_server_args(cfg, QWEN25_MATH_7B, hf_major=4)[3])
    assert v4 == {"max_position_embeddings": 16384, "rope_theta": 40000.0}
    command = SGLangServer("/models/qwen", port=30000, tp=2, device="cuda",
                           extra_args=args).command()
    assert command[command.index("--context-length") + 1] == "9218"
    assert json.loads(command[command.index("--json-model-override-args") + 1]) == override
    # nothing overridden: the length alone
    plain = recipe("model.rope_theta=null", "model.max_position_embeddings=null",
                   "data.max_response_len=3072")
    # 4096 + 2 would exceed the model's 4096 positions, which SGLang refuses: capped
    assert context_server_args(plain, QWEN25_MATH_7B) == ["--context-length", "4096"]


def test_trainer_and_server_read_the_same_values():
    """The Megatron side (with_overrides -> GPTModel kwargs) and the SGLang side
    (model_override_args) give the same theta and positions for every config format."""
    from srft_mcore.config import ModelConfig
    from srft_mcore.config.hf_config import rope_theta

    m = ModelConfig(rope_theta=40000, max_position_embeddings=16384)
    for hf in (QWEN25_MATH_7B,
               {**QWEN25_MATH_7B, "rope_parameters": {"rope_type": "default",
                                                      "rope_theta": 10000.0}}):
        trainer = with_overrides(hf, m)
        server = model_override_args(hf, m.rope_theta, m.max_position_embeddings, hf_major=5)
        assert rope_theta(trainer) == server["rope_parameters"]["rope_theta"] == 40000.0
        assert trainer["max_position_embeddings"] == server["max_position_embeddings"]


def _server_logprobs(url, ids, max_new_tokens):
    r = requests.post(url + "/generate", json={
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            "ignore_eos": True}}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    meta = r.json()["meta_info"]
    return [lp for lp, _tok, *_ in meta["input_token_logprobs"][1:]], meta


def _hf_logprobs(model_dir, ids):
    from srft_mcore.doctor.parity import reference_logits

    logp = torch.log_softmax(reference_logits(model_dir, torch.tensor([ids]))[0], dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


@pytest.mark.slow
def test_sglang_server_serves_the_overridden_rope_and_context(tmp_path):
    """A tiny model with 64 positions and theta 1e4, served with theta 100 and 256 positions:
    a 40 + 60 token request is accepted, and the prompt log-probs are those of transformers
    with the overridden config, not the stock one."""
    from srft_mcore.config import ModelConfig
    from srft_mcore.models.tiny import make_tiny_hf_model

    stock = make_tiny_hf_model(str(tmp_path / "stock"), max_position_embeddings=64)
    with open(os.path.join(stock, "config.json")) as f:
        hf = json.load(f)
    # the reference: the same weights with the override written into config.json
    patched = str(tmp_path / "patched")
    shutil.copytree(stock, patched)
    with open(os.path.join(patched, "config.json"), "w") as f:
        json.dump(with_overrides(hf, ModelConfig(rope_theta=100.0, max_position_embeddings=256)),
                  f)
    cfg = load_config(None, ["model.rope_theta=100", "model.max_position_embeddings=256",
                             "data.max_prompt_len=40", "data.max_response_len=60"])
    validate(cfg, hf_config=hf)
    ids = torch.randint(1, hf["vocab_size"], (40,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    with SGLangServer.launch(stock, extra_args=context_server_args(cfg, hf),
                             log_path=str(tmp_path / "server.log"),
                             startup_timeout_s=300) as server:
        got, meta = _server_logprobs(server.url, ids, max_new_tokens=60)
        info = requests.get(server.url + "/get_server_info", timeout=30).json()
    assert meta["completion_tokens"] == 60  # 100 tokens > the checkpoint's 64 positions
    assert info["context_length"] == 102
    got = torch.tensor(got)
    want, stock_lp = _hf_logprobs(patched, ids), _hf_logprobs(stock, ids)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - stock_lp).abs().max().item() > 1e-2  # the override changed the model
