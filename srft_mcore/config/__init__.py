"""Typed run configuration: YAML file + ``a.b.c=value`` overrides + ``validate()``.

Every field has a one-line docstring (the string literal under it). ``load_config`` rejects
unknown keys and values of the wrong type while reading; ``validate`` checks the
combinations (parallel sizes against the model and the world size, batch arithmetic, ...)
before any process group or model is created. Errors name the key, the value and the fix.

The package: ``schema`` (the sections and their fields), ``loading`` (YAML + overrides),
``validation`` (``validate``), ``hf_config`` (the model's ``config.json``) and ``errors``.
None of it imports torch, so a launcher can load and check a run before any rank starts.
"""
from srft_mcore.config.errors import ConfigError
from srft_mcore.config.hf_config import load_hf_config
from srft_mcore.config.loading import describe, load_config, parse_override, save_config
from srft_mcore.config.schema import (CHOICES, SGLANG_MEM_FRACTION, AlgorithmConfig,
                                      CheckpointConfig, Config, DataConfig, EvalConfig,
                                      LoggingConfig, ModelConfig, OptimizerConfig,
                                      ParallelConfig, RewardConfig, RolloutConfig, TrainConfig,
                                      sglang_mem_fraction)
from srft_mcore.config.validation import check_context_length, validate

__all__ = ["CHOICES", "SGLANG_MEM_FRACTION", "AlgorithmConfig", "CheckpointConfig", "Config",
           "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "RewardConfig", "RolloutConfig", "TrainConfig",
           "check_context_length", "describe", "load_config", "load_hf_config",
           "parse_override", "save_config", "sglang_mem_fraction", "validate"]
