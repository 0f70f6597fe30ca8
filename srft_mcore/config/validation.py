"""``validate``: the combinations of a loaded configuration (value ranges, parallel sizes
against the model and the world size, batch arithmetic, rollout endpoints, context length),
checked before any process group or model is created."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from srft_mcore.config.errors import ConfigError, _err
from srft_mcore.config.hf_config import context_limit, with_overrides
from srft_mcore.config.schema import CHOICES, Config, OptimizerConfig, RolloutConfig


def _divides(key: str, value: int, what: str, total: int, fix: str) -> None:
    if total % value != 0:
        raise _err(key, value, f"does not divide {what} ({total})", fix)


def check_context_length(cfg: Config, hf_config: Optional[dict]) -> None:
    """Prompt + response tokens must fit the model's context: config.json's (with RoPE
    scaling), or the model.rope_theta / model.max_position_embeddings overrides, which the
    trainer's model and the SGLang servers both get."""
    m, d = cfg.model, cfg.data
    if m.rope_theta is not None and m.rope_theta <= 0:
        raise _err("model.rope_theta", m.rope_theta, "must be > 0",
                   "give a RoPE base such as 40000, or null for the checkpoint's")
    if m.max_position_embeddings is not None and m.max_position_embeddings < 1:
        raise _err("model.max_position_embeddings", m.max_position_embeddings, "must be >= 1",
                   "give a context length such as 16384, or null for the checkpoint's")
    if hf_config is None:
        return
    limit = context_limit(with_overrides(hf_config, m))
    need = d.max_prompt_len + d.max_response_len
    if limit is None or need <= limit:
        return
    source = (f"model.max_position_embeddings={m.max_position_embeddings}"
              if m.max_position_embeddings is not None else
              f"max_position_embeddings={hf_config.get('max_position_embeddings')} in the "
              f"model's config.json")
    raise ConfigError(
        f"config error: data.max_prompt_len + data.max_response_len = {d.max_prompt_len} + "
        f"{d.max_response_len} = {need} tokens, but the model's context is {limit} tokens "
        f"({source}). Fix: raise it with model.max_position_embeddings (>= {need}; trainer "
        f"and SGLang servers both get it), usually with a larger model.rope_theta (the "
        f"paper's Qwen2.5-Math-7B setup: model.rope_theta=40000 "
        f"model.max_position_embeddings=16384), or shorten data.max_prompt_len / "
        f"data.max_response_len")


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and \
        len(value.split("://", 1)[1].strip("/")) > 0


def _check_rollout_endpoints(r: RolloutConfig) -> None:
    """Servers by URL, the router and the weight-sync address: the combinations that work."""
    if r.urls is not None:
        if not r.urls:
            raise _err("rollout.urls", r.urls, "is an empty list",
                       "list the running servers (e.g. [\"http://node3:30000\"]), or null to "
                       "launch rollout.num_servers servers here")
        bad = [u for u in r.urls if not _is_http_url(u)]
        if bad:
            raise _err("rollout.urls", r.urls, f"{bad[0]!r} is not an http(s) URL",
                       "give each server as http://HOST:PORT")
        if len(set(u.rstrip("/") for u in r.urls)) != len(r.urls):
            raise _err("rollout.urls", r.urls, "lists a server twice",
                       "give each server once (it would get every weight update twice)")
    if r.router and r.router_url is not None:
        raise _err("rollout.router_url", r.router_url, "rollout.router=true launches a router "
                   "and rollout.router_url attaches to a running one",
                   "set only one of them (router_url=null, or router=false)")
    if r.router_url is not None:
        if not _is_http_url(r.router_url):
            raise _err("rollout.router_url", r.router_url, "is not an http(s) URL",
                       "give the router as http://HOST:PORT")
        if not r.urls:
            raise _err("rollout.router_url", r.router_url, "needs rollout.urls: the weight sync "
                       "goes to every server directly, not through the router",
                       "list the servers behind the router in rollout.urls")
        if r.router_url.rstrip("/") in [u.rstrip("/") for u in r.urls]:
            raise _err("rollout.router_url", r.router_url, "is also listed in rollout.urls",
                       "rollout.urls lists the SGLang servers behind the router, not the router")
    if (r.router or r.router_url is not None) and r.seeded:
        key, value = ("rollout.router", True) if r.router else ("rollout.router_url",
                                                                 r.router_url)
        raise _err(key, value, "the router drops sampling_params.custom_params, which carry "
                   "the per-sample seeds of rollout.seeded=true (a server then fails on them)",
                   "set rollout.seeded=false, or send /generate to the servers directly "
                   "(rollout.router=false, rollout.router_url=null)")
    if r.sync_address is not None and not r.sync_address.strip():
        raise _err("rollout.sync_address", r.sync_address, "is empty",
                   "give this node's address as the servers reach it, auto, or null")
    if not r.reattach_timeout_s >= 0:
        raise _err("rollout.reattach_timeout_s", r.reattach_timeout_s, "must be >= 0",
                   "give the seconds to wait for an attached server, e.g. 300 (0: none)")
    if r.mem_fraction is not None and not 0 < r.mem_fraction < 1:
        raise _err("rollout.mem_fraction", r.mem_fraction, "must be in (0, 1)",
                   "use e.g. 0.85 on dedicated GPUs, 0.6 colocated, or null for these defaults")


def _check_demo_quality(d) -> None:
    """data.demo_quality: fractions, choices, and the source file's existence (read and
    matched when the data is loaded, still before the model is built)."""
    q = d.demo_quality
    for key in ("wrong_fraction", "truncate_fraction"):
        if not 0.0 <= getattr(q, key) <= 1.0:
            raise _err(f"data.demo_quality.{key}", getattr(q, key), "must be in [0, 1]",
                       "give the fraction of demonstrations to corrupt, e.g. 0.25")
    if q.wrong_fraction + q.truncate_fraction > 1.0 + 1e-9:  # float sums like 0.7 + 0.3
        raise _err("data.demo_quality.truncate_fraction", q.truncate_fraction,
                   f"wrong and truncated demonstrations are disjoint, and with "
                   f"data.demo_quality.wrong_fraction={q.wrong_fraction} they exceed 1",
                   "make the two fractions sum to at most 1")
    for key, allowed in (("wrong_kind", ("auto", "slip", "swap")),
                         ("source_missing", ("error", "keep"))):
        if getattr(q, key) not in allowed:
            raise _err(f"data.demo_quality.{key}", getattr(q, key), "not a supported choice",
                       f"use one of: {', '.join(allowed)}")
    if q.source is not None and not os.path.exists(q.source):
        raise _err("data.demo_quality.source", q.source, "does not exist",
                   "give a file of prompts and demonstrations (jsonl, json, parquet, arrow or "
                   "a save_to_disk directory), or null to keep data.path's demonstrations")


def _check_dynamic_sampling(cfg: Config) -> None:
    """rollout.dynamic_sampling and its options (srft_mcore/training/dynamic_sampling.py)."""
    from srft_mcore.training.dynamic_sampling import DEMO_GROUP_ALGORITHMS, counts_demo

    r, name = cfg.rollout, cfg.algorithm.name
    if r.max_resample_rounds < 0:
        raise _err("rollout.max_resample_rounds", r.max_resample_rounds, "must be >= 0",
                   "give the further rounds a step may draw, e.g. 3 (0: only filter)")
    if not r.dynamic_sampling:
        return
    if name == "sft":
        raise _err("rollout.dynamic_sampling", True, "algorithm.name=sft trains on the "
                   "demonstrations only: there are no rollout groups to filter",
                   "set rollout.dynamic_sampling=false, or an algorithm that trains on "
                   "rollouts (grpo, luffy, srft)")
    if r.dynamic_sampling_count_demo and name not in DEMO_GROUP_ALGORITHMS:
        raise _err("rollout.dynamic_sampling_count_demo", True, f"algorithm.name={name} puts "
                   f"no demonstration in the rollout groups",
                   "set rollout.dynamic_sampling_count_demo=false or null")
    if r.n_samples == 1 and not counts_demo(cfg):
        raise _err("rollout.n_samples", 1, "with one rollout per prompt every group has one "
                   "reward, so dynamic sampling would drop every group",
                   "sample several rollouts per prompt (e.g. rollout.n_samples=8), or set "
                   "rollout.dynamic_sampling=false")


def _check_clip(a) -> None:
    """The decoupled ratio clip: each side >= 0, and a side left null needs clip_eps (resolved:
    null for the algorithms without a clip, or a negative value, is no clip)."""
    for key in ("clip_eps_low", "clip_eps_high"):
        value = getattr(a, key)
        if value is not None and not value >= 0:
            raise _err(f"algorithm.{key}", value, "must be >= 0",
                       "use e.g. algorithm.clip_eps_low=0.2 algorithm.clip_eps_high=0.28 "
                       "(DAPO), or null for algorithm.clip_eps")
    no_clip = a.clip_eps is None or a.clip_eps < 0
    if no_clip and (a.clip_eps_low is None) != (a.clip_eps_high is None):
        given, other = (("clip_eps_low", "clip_eps_high") if a.clip_eps_high is None
                        else ("clip_eps_high", "clip_eps_low"))
        raise _err(f"algorithm.{given}", getattr(a, given), f"sets one side of the ratio clip, "
                   f"but algorithm.{other} is null and there is no algorithm.clip_eps to take "
                   f"its place (algorithm.name={a.name} clips nothing by default)",
                   f"set algorithm.{other} too, or algorithm.clip_eps")


def _check_loss_scale(o: OptimizerConfig) -> None:
    """The float16 dynamic loss scaler's settings (Megatron asserts the same ranges)."""
    if not o.min_loss_scale > 0:
        raise _err("optimizer.min_loss_scale", o.min_loss_scale, "must be > 0", "use e.g. 1.0")
    if not o.initial_loss_scale >= o.min_loss_scale:
        raise _err("optimizer.initial_loss_scale", o.initial_loss_scale,
                   f"is below optimizer.min_loss_scale ({o.min_loss_scale})",
                   "use a power of two such as 65536")
    for key in ("loss_scale_window", "hysteresis"):
        if getattr(o, key) < 1:
            raise _err(f"optimizer.{key}", getattr(o, key), "must be >= 1",
                       f"set optimizer.{key} to a positive integer")


def _check_weight_schedule(a) -> None:
    """algorithm.weight_schedule and its settings (srft_mcore/algo/weight_schedule.py)."""
    s = a.weight_schedule
    key = "algorithm.weight_schedule"
    if s == "exp":
        return
    if a.name not in ("srft", "srft_no_wsft", "srft_no_wrl"):
        raise _err(key, s, f"algorithm.name={a.name} has no entropy weights (w_SFT / w_RL) "
                   f"to schedule", "use weight_schedule=exp, or an srft algorithm (srft, "
                   "srft_no_wsft, srft_no_wrl)")
    if s in ("ema", "ema2", "target") and a.entropy_weighting != "batch":
        raise _err("algorithm.entropy_weighting", a.entropy_weighting,
                   f"weight_schedule={s} gives one weight per step from the step's entropy",
                   "set algorithm.entropy_weighting=batch (or weight_schedule=exp for "
                   "per-token weights)")
    halflives = {"ema": ("entropy_ema_halflife",),
                 "ema2": ("entropy_ema_halflife", "entropy_ema_slow_halflife")}
    for f in halflives.get(s, ()):
        if not 0 < getattr(a, f) < float("inf"):
            raise _err(f"algorithm.{f}", getattr(a, f), "must be a finite number of steps > 0",
                       "give the half-life of the entropy average in steps, e.g. 10")
    if s == "ema2":
        if not a.entropy_ema_slow_halflife > a.entropy_ema_halflife:
            raise _err("algorithm.entropy_ema_slow_halflife", a.entropy_ema_slow_halflife,
                       f"the slow average must have a longer half-life than the fast one "
                       f"(algorithm.entropy_ema_halflife={a.entropy_ema_halflife})",
                       "use e.g. entropy_ema_halflife=10 entropy_ema_slow_halflife=50")
        if not a.entropy_trend_gain >= 0:
            raise _err("algorithm.entropy_trend_gain", a.entropy_trend_gain, "must be >= 0 (a "
                       "negative gain would give a falling entropy less SFT, against Eq. 8)",
                       "use e.g. 2.0 (0: the slow average alone)")
    if s == "target":
        if a.target_entropy is not None and not 0 < a.target_entropy < float("inf"):
            raise _err("algorithm.target_entropy", a.target_entropy,
                       "must be a finite entropy > 0 (nats)", "use e.g. 0.5")
        if not 0 <= a.target_gain < float("inf"):
            raise _err("algorithm.target_gain", a.target_gain, "must be >= 0 (a negative gain "
                       "drives the entropy away from the target)", "use e.g. 0.2")
        if not a.c_rl > 0:
            raise _err("algorithm.c_rl", a.c_rl, "weight_schedule=target moves log w_RL, so "
                       "c_rl must be > 0", "use the paper's 0.1")
    if s in ("ema2", "target"):
        if not a.weight_min >= 0:
            raise _err("algorithm.weight_min", a.weight_min, "must be >= 0",
                       "use e.g. 0.01 (0: no lower bound)")
        if not a.weight_min <= a.weight_max < float("inf"):
            raise _err("algorithm.weight_max", a.weight_max,
                       f"must be finite and >= algorithm.weight_min ({a.weight_min})",
                       "use e.g. weight_min=0.01 weight_max=1.0")
        if not a.weight_max > 0:
            raise _err("algorithm.weight_max", a.weight_max, "must be > 0", "use e.g. 1.0")


def validate(cfg: Config, world_size: Optional[int] = None,
             hf_config: Optional[dict] = None) -> Config:
    """Check value ranges and combinations; fill ``parallel.dp`` from the world size.

    ``hf_config`` is the model's HF ``config.json`` as a dict (checks against heads and
    layers are skipped without it). Raises ConfigError naming key, value and fix.
    """
    flat = {}
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            flat[f"{sec.name}.{f.name}"] = getattr(getattr(cfg, sec.name), f.name)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise _err(key, flat[key], "not a supported choice",
                       f"use one of: {', '.join(str(a) for a in allowed)}")
    from srft_mcore.algo.defaults import resolve

    cfg.algorithm = resolve(cfg.algorithm)
    for key in ("parallel.tp", "parallel.pp", "parallel.cp", "rollout.n_samples",
                "train.steps", "train.prompts_per_step", "train.micro_batch_size",
                "train.mini_batches", "eval.n_samples",
                "checkpoint.every", "rollout.num_servers", "rollout.server_tp",
                "rollout.bucket_mb", "model.make_vocab_size_divisible_by"):
        if flat[key] < 1:
            raise _err(key, flat[key], "must be >= 1", f"set {key} to a positive integer")
    p = cfg.parallel
    if p.sequence_parallel and p.tp == 1:
        raise _err("parallel.sequence_parallel", True, "needs tensor parallelism",
                   "set parallel.tp > 1 or parallel.sequence_parallel=false")
    if cfg.rollout.seeded and cfg.rollout.top_p < 1.0:
        raise _err("rollout.top_p", cfg.rollout.top_p, "seeded rollouts sample the full "
                   "distribution", "set rollout.top_p=1.0 or rollout.seeded=false")
    if p.cp > 1:
        raise _err("parallel.cp", p.cp, "context parallelism is not supported yet (sequences "
                   "are not split across CP ranks)", "set parallel.cp=1; use tp/pp for long "
                   "sequences")
    _check_loss_scale(cfg.optimizer)
    if cfg.optimizer.warmup_steps >= cfg.train.steps:
        raise _err("optimizer.warmup_steps", cfg.optimizer.warmup_steps,
                   f"the warm-up must end before the run's {cfg.train.steps} steps do",
                   "set optimizer.warmup_steps below train.steps")
    if cfg.model.load_optimizer and not cfg.model.load_mcore:
        raise _err("model.load_optimizer", True, "takes the optimizer state of the checkpoint "
                   "model.load_mcore names, and that is not set",
                   "set model.load_mcore=CHECKPOINT or model.load_optimizer=false")
    from srft_mcore.algo.defaults import behaviour_correction

    cfg.algorithm = a = behaviour_correction(cfg.algorithm, cfg.rollout)
    if a.tis_cap is not None and a.tis_cap == 0:
        raise _err("algorithm.tis_cap", a.tis_cap, "must be > 0 (or < 0: off)",
                   "use e.g. 2.0, or -1 (off)")
    if a.tis_cap is not None and cfg.rollout.seeded:
        raise _err("algorithm.tis_cap", a.tis_cap, "seeded rollouts report the log-probs of "
                   "the Gumbel-perturbed logits, not the sampling policy's",
                   "set rollout.seeded=false, or algorithm.tis_cap=null")
    if a.kl_coef < 0:
        raise _err("algorithm.kl_coef", a.kl_coef, "must be >= 0", "use 0 (off) or e.g. 0.001")
    _check_weight_schedule(a)
    if a.token_weight_cap <= 0:
        raise _err("algorithm.token_weight_cap", a.token_weight_cap, "must be > 0",
                   "use e.g. 1.0")
    _check_clip(a)
    _check_dynamic_sampling(cfg)
    dropout = {k: getattr(cfg.model, k) for k in ("hidden_dropout", "attention_dropout")
               if getattr(cfg.model, k) > 0}
    if dropout and a.name != "sft":
        # the old-policy pass (eval mode, no dropout) gives pi_old on every mini-batch, the
        # first included, so the training pass (with dropout) is not that policy: ratio != 1
        key, value = next(iter(dropout.items()))
        raise _err(f"model.{key}", value, f"dropout makes the training pass differ from the "
                   f"no-grad old-policy pass (eval mode), so pi/pi_old is not 1 even on the "
                   f"first mini-batch (train.mini_batches={cfg.train.mini_batches}; "
                   f"train.mini_batches=1 does not help: the ratio always uses that pass)",
                   f"set model.hidden_dropout=0 and model.attention_dropout=0 for "
                   f"algorithm.name={a.name} (only algorithm.name=sft, which has no ratio, "
                   f"trains with dropout)")
    budget = cfg.train.max_tokens_per_micro_batch
    if budget is not None and budget < cfg.data.max_prompt_len + cfg.data.max_response_len:
        raise _err("train.max_tokens_per_micro_batch", budget, "is below the longest sequence "
                   f"(data.max_prompt_len + data.max_response_len = "
                   f"{cfg.data.max_prompt_len + cfg.data.max_response_len})",
                   "raise it (a few times the longest sequence packs well), or null to pad")
    if cfg.train.prompts_per_step % cfg.train.mini_batches != 0:
        raise _err("train.mini_batches", cfg.train.mini_batches,
                   f"does not divide train.prompts_per_step ({cfg.train.prompts_per_step})",
                   "choose a divisor: each mini-batch holds whole prompt groups")
    _check_demo_quality(cfg.data)
    if cfg.eval.every < 0:
        raise _err("eval.every", cfg.eval.every, "must be >= 0", "use 0 (off) or a step count")
    if cfg.eval.every and cfg.eval.splits is None and cfg.data.path is not None:
        raise _err("eval.splits", None, "eval.every is set but no held-out files are given",
                   "add eval.splits: {name: FILE.jsonl, ...} (srft-eval layouts)")
    if cfg.rollout.overlap and cfg.rollout.weight_sync == "tensor":
        raise _err("rollout.overlap", True, "colocated servers (weight_sync=tensor) release "
                   "their GPU memory while the trainer runs, so they cannot generate then",
                   "use dedicated rollout GPUs (weight_sync=distributed) or rollout.overlap=false")
    if cfg.rollout.offload not in ("auto", "none", "state", "all"):
        raise _err("rollout.offload", cfg.rollout.offload, "not a supported choice",
                   "use one of: auto, none, state, all")
    if cfg.rollout.offload in ("state", "all") and cfg.rollout.weight_sync != "tensor":
        raise _err("rollout.offload", cfg.rollout.offload, "moving the trainer's state off the "
                   "GPU during generation only makes sense when the rollout servers share the "
                   f"trainer's GPUs (rollout.weight_sync=tensor; this run has "
                   f"rollout.weight_sync={cfg.rollout.weight_sync})",
                   "set rollout.weight_sync=tensor (colocated servers), or rollout.offload=none")
    _check_rollout_endpoints(cfg.rollout)
    if cfg.rollout.temperature <= 0:
        raise _err("rollout.temperature", cfg.rollout.temperature, "must be > 0 for RL rollouts",
                   "use a positive temperature (the paper uses 1.0)")
    if cfg.reward.workers < 0:
        raise _err("reward.workers", cfg.reward.workers, "must be >= 0",
                   "use 0 (score in the trainer's process, no time limit) or a process count "
                   "such as 2")
    if not 0 < cfg.reward.timeout_s < float("inf"):
        raise _err("reward.timeout_s", cfg.reward.timeout_s, "must be a finite number > 0",
                   "give the seconds one answer may take, e.g. 10 (reward.workers=0 scores "
                   "without a time limit)")

    check_context_length(cfg, hf_config)
    if hf_config is not None:
        heads = hf_config["num_attention_heads"]
        kv = hf_config.get("num_key_value_heads") or heads
        layers = hf_config["num_hidden_layers"]
        _divides("parallel.tp", p.tp, "num_attention_heads", heads,
                 f"choose parallel.tp from the divisors of {heads}")
        _divides("parallel.tp", p.tp, "num_key_value_heads", kv,
                 f"choose parallel.tp from the divisors of {kv} (GQA key/value heads)")
        if p.pp_layer_split is not None:
            split = p.pp_layer_split
            if len(split) != p.pp or sum(split) != layers or min(split) < 1:
                raise _err("parallel.pp_layer_split", split,
                           f"needs {p.pp} positive entries summing to num_hidden_layers={layers}",
                           "give one layer count per pipeline stage")
        elif layers % p.pp != 0:
            raise _err("parallel.pp", p.pp, f"does not divide num_hidden_layers ({layers})",
                       f"choose a divisor of {layers}, or give parallel.pp_layer_split "
                       f"(e.g. an uneven split summing to {layers})")
    elif p.pp_layer_split is not None and len(p.pp_layer_split) != p.pp:
        raise _err("parallel.pp_layer_split", p.pp_layer_split,
                   f"needs one entry per pipeline stage (pp={p.pp})", "give pp entries")

    if world_size is not None:
        mp = p.tp * p.pp * p.cp
        if world_size % mp != 0:
            raise _err("parallel", f"tp={p.tp} pp={p.pp} cp={p.cp}",
                       f"tp*pp*cp={mp} does not divide the world size {world_size}",
                       f"launch a multiple of {mp} ranks or change tp/pp")
        dp = world_size // mp
        if p.dp is not None and p.dp != dp:
            raise _err("parallel.dp", p.dp,
                       f"tp*pp*cp*dp={mp * p.dp} != world size {world_size}",
                       f"set parallel.dp={dp}, leave it unset, or launch {mp * p.dp} ranks")
        p.dp = dp
    if p.dp is not None:
        # (the sequence count needs no check: micro-batches are padded with masked sequences)
        mini = cfg.train.prompts_per_step // cfg.train.mini_batches
        if mini % p.dp != 0:
            raise _err("train.prompts_per_step", cfg.train.prompts_per_step,
                       f"{mini} prompts per mini-batch are not divisible by the data-parallel "
                       f"size {p.dp}", f"use a multiple of {p.dp * cfg.train.mini_batches}")
    return cfg

