"""The trainer configuration a plan stands for (as ``key=value`` overrides), and the
trainer's own check of it: :func:`srft_mcore.config.validate` with the plan's world size and
the model's heads and layers. A plan the trainer would refuse is not runnable, so the
planner never ranks it as fitting (one check for srft-plan and tools/make_recipes.py).

torch-free: the config package imports no torch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from srft_mcore.config import ConfigError, RolloutConfig, load_config, validate
from srft_mcore.planning.model_shape import ModelShape
from srft_mcore.planning.run_shape import Assumptions, Layout, RunShape

ROLLOUT_FIELDS = {f.name for f in dataclasses.fields(RolloutConfig)}
HAS_OFFLOAD = "offload" in ROLLOUT_FIELDS
"""Whether this trainer's config has rollout.offload (written only then)."""


def hf_shape(m: ModelShape) -> dict:
    """What validation checks the layout against: heads, key/value heads, layers."""
    return {"num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
            "num_hidden_layers": m.layers}


def plan_config(lay: Layout, split: Optional[list], mode: str, servers: int, server_tp: int,
                mem_fraction: float, run: RunShape, a: Assumptions) -> dict:
    """The dotted config keys a plan sets (the rest keep their defaults)."""
    colocated = mode == "colocated"
    values = {
        "model.dtype": a.dtype,
        "model.recompute_granularity": "full" if lay.recompute else None,
        "parallel.tp": lay.tp, "parallel.pp": lay.pp, "parallel.dp": lay.dp,
        "parallel.pp_layer_split": split,
        "parallel.sequence_parallel": lay.sequence_parallel,
        "parallel.use_distributed_optimizer": lay.distributed_optimizer,
        "data.max_prompt_len": run.prompt_len, "data.max_response_len": run.response_len,
        "rollout.n_samples": run.n_samples,
        "rollout.num_servers": servers, "rollout.server_tp": server_tp,
        "rollout.weight_sync": "tensor" if colocated else a.weight_sync,
        "rollout.mem_fraction": mem_fraction,
        "rollout.overlap": bool(run.overlap and not colocated),
        "train.prompts_per_step": run.prompts_per_step,
        "train.mini_batches": run.mini_batches,
        "train.micro_batch_size": run.micro_batch,
        "train.max_tokens_per_micro_batch": run.max_tokens_per_micro_batch,
    }
    if HAS_OFFLOAD:
        values["rollout.offload"] = a.offload if colocated else "none"
    return values


def to_overrides(values: dict) -> list:
    """``key=value`` strings as srft-train takes them (YAML values: null, true, [a, b])."""
    def text(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ",".join(str(x) for x in v) + "]"
        return str(v)
    return [f"{k}={text(v)}" for k, v in values.items()]


def config_problem(values: dict, world_size: int, hf: dict) -> Optional[str]:
    """The trainer's refusal of ``values`` (None when it accepts them)."""
    try:
        validate(load_config(None, to_overrides(values)), world_size=world_size,
                 hf_config=hf)
    except ConfigError as e:
        return str(e)
    return None
