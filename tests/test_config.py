"""Config loading, overrides and validation: every bad case names key, value and fix."""
import os
import subprocess
import sys

import pytest

from srft_mcore.config import Config, ConfigError, load_config, parse_override, validate

QWEN_LIKE = dict(num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24)


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "parallel:\n  tp: 2\nalgorithm:\n  name: grpo\n")
    cfg = load_config(path, ["parallel.pp=2", "optimizer.lr=3e-6", "rollout.urls=[a, b]",
                             "model.hf_path=null"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.algorithm.name == "grpo"
    assert cfg.optimizer.lr == pytest.approx(3e-6)
    assert cfg.rollout.urls == ["a", "b"]
    assert cfg.model.hf_path is None
    assert isinstance(load_config(None, ["optimizer.lr=1"]).optimizer.lr, float)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    with pytest.raises(ConfigError, match="has no '='"):
        parse_override("parallel.tp")


@pytest.mark.parametrize("override, match", [
    (["parallel.tpp=2"], r"parallel\.tpp=2: unknown key.*use one of: .*tp"),
    (["nosection.x=1"], r"nosection=.*unknown key"),
    (["parallel.tp=two"], r"parallel\.tp='two': expected int, got str"),
    (["parallel.tp=2.5"], r"parallel\.tp=2\.5: expected int"),
    (["train.deterministic=3"], r"expected bool"),
    (["parallel=3"], r"parallel=3: expected a mapping"),
])
def test_unknown_keys_and_wrong_types(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def cfg_with(**parallel):
    cfg = Config()
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    cfg.train.prompts_per_step = 8
    return cfg


@pytest.mark.parametrize("parallel, world, match", [
    (dict(tp=4), 8, r"parallel\.tp=4: does not divide num_attention_heads \(14\)"),
    (dict(tp=7), 7, r"parallel\.tp=7: does not divide num_key_value_heads \(2\).*divisors of 2"),
    (dict(pp=5), 5, r"parallel\.pp=5: does not divide num_hidden_layers \(24\).*pp_layer_split"),
    (dict(pp=2, pp_layer_split=[10, 10]), 2, r"pp_layer_split=\[10, 10\].*summing to"),
    (dict(tp=2, pp=2), 6, r"tp\*pp\*cp=4 does not divide the world size 6"),
    (dict(tp=2, dp=3), 4, r"parallel\.dp=3: tp\*pp\*cp\*dp=6 != world size 4.*parallel\.dp=2"),
    (dict(sequence_parallel=True), 1, r"sequence_parallel=True: needs tensor parallelism"),
])
def test_impossible_parallel_layouts(parallel, world, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate(cfg_with(**parallel), world_size=world, hf_config=QWEN_LIKE)
    assert "Fix:" in str(e.value)


def test_valid_layouts_fill_dp():
    cfg = validate(cfg_with(tp=2, pp=2), world_size=8, hf_config=QWEN_LIKE)
    assert cfg.parallel.dp == 2
    cfg = validate(cfg_with(pp=2, pp_layer_split=[11, 13]), world_size=2, hf_config=QWEN_LIKE)
    assert cfg.parallel.dp == 1


def test_choices_and_batch_arithmetic():
    cfg = Config()
    cfg.algorithm.name = "ppo"
    with pytest.raises(ConfigError, match=r"algorithm\.name='ppo'.*srft_no_wsft"):
        validate(cfg)
    cfg = Config()
    cfg.train.prompts_per_step = 3
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step=3: 3 prompts per "
                                          r"mini-batch are not divisible by the data-parallel"):
        validate(cfg, world_size=2)
    cfg = load_config(None, ["train.prompts_per_step=6", "train.mini_batches=4"])
    with pytest.raises(ConfigError, match=r"train\.mini_batches=4: does not divide"):
        validate(cfg)
    cfg = load_config(None, ["train.prompts_per_step=8", "train.mini_batches=2"])
    with pytest.raises(ConfigError, match=r"4 prompts per mini-batch .* data-parallel size 8"):
        validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"parallel\.cp=2: context parallelism"):
        validate(load_config(None, ["parallel.cp=2"]))
    with pytest.raises(ConfigError, match=r"algorithm\.tis_cap=2\.0: seeded rollouts"):
        validate(load_config(None, ["algorithm.tis_cap=2.0", "rollout.seeded=true"]))
    validate(load_config(None, ["algorithm.tis_cap=2.0"]))


@pytest.mark.parametrize("name", ["srft", "srft_no_wsft", "srft_no_wrl", "sft", "grpo",
                                  "luffy"])
def test_each_algorithm_gets_its_own_defaults(name):
    from srft_mcore.algo.defaults import DEFAULTS

    cfg = load_config(None, [f"algorithm.name={name}"])
    for field, value in DEFAULTS[name].items():
        assert getattr(cfg.algorithm, field) == value, field
    # a value the user sets wins; a negative clip means no clipping
    cfg = load_config(None, [f"algorithm.name={name}", "algorithm.loss_agg=token-mean",
                             "algorithm.clip_eps=-1"])
    assert cfg.algorithm.loss_agg == "token-mean" and cfg.algorithm.clip_eps < 0
    # it stays off through validation's second resolution (and in the saved config)
    from srft_mcore.algo.losses import clip_range

    assert clip_range(validate(cfg).algorithm) == (None, None)


def test_baseline_defaults_from_their_papers():
    luffy = load_config(None, ["algorithm.name=luffy"]).algorithm
    assert (luffy.offpolicy_shaping, luffy.adv_std_norm, luffy.clip_eps, luffy.entropy_coef,
            luffy.loss_agg) == ("luffy", False, None, 0.001, "sum-max-len")
    grpo = load_config(None, ["algorithm.name=grpo"]).algorithm
    assert (grpo.clip_eps, grpo.loss_agg) == (0.2, "token-mean")  # verl's loss_agg_mode
    srft = load_config(None, []).algorithm
    assert (srft.onpolicy_form, srft.entropy_weighting, srft.kl_coef, srft.clip_eps) == (
        "sign", "batch", 0.0, None)
    assert load_config(None, ["algorithm.name=srft_no_wrl"]).algorithm.fixed_weight == 1.0


def test_readme_holds_the_defaults_table():
    from srft_mcore.algo.defaults import markdown_table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    assert markdown_table() in readme


def run_doctor_config(*args):
    return subprocess.run([sys.executable, "-m", "srft_mcore.doctor.cli", "config", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_config_before_launch(tmp_path):
    bad = run_doctor_config("--world-size", "3", "parallel.tp=2")
    assert bad.returncode == 2
    assert "tp*pp*cp=2 does not divide the world size 3" in bad.stderr
    assert '"ok": false' in bad.stdout.strip().splitlines()[-1]
    from cli_main import run_main  # in this process: the command's start-up costs seconds
    from srft_mcore.doctor.cli import main

    rc, _, err = run_main(main, ["config", "--world-size", "2", "parallel.tp=2",
                                 "train.prompts_per_step=4"])
    assert rc == 0, err


def test_loading_and_validating_a_config_imports_no_torch():
    """Small CLI calls stay fast: the config (and the algorithm defaults it resolves) load
    without torch."""
    code = ("import sys\n"
            "from srft_mcore.config import load_config, validate\n"
            "validate(load_config(None, ['algorithm.name=grpo', 'train.steps=3']))\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[-500:]


def test_doctor_help_imports_no_torch():
    """``srft-doctor --help`` parses its arguments without torch: each sub-command imports
    what it needs when it runs."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "srft_mcore.doctor.cli",
                          "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "srft-doctor" in out.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")]
    assert "srft_mcore.doctor" in imported  # the import log was read
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], imported
