"""Typed run configuration: YAML file + ``a.b.c=value`` overrides + ``validate()``.

Every field has a one-line docstring (the string literal under it). ``load_config`` rejects
unknown keys and values of the wrong type while reading; ``validate`` checks the
combinations (parallel sizes against the model and the world size, batch arithmetic, ...)
before any process group or model is created. Errors name the key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and the fix."""


def _err(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"config error: {key}={value!r}: {problem}. Fix: {fix}")


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    hf_path: Optional[str] = None
    """HF model directory (config.json + tokenizer); None = the embedded tiny model."""
    load_hf_weights: bool = True
    """Load the weights from hf_path's safetensors at start-up (else random init)."""
    load_mcore: Optional[str] = None
    """A Megatron dist_checkpointing directory to start from instead of HF weights."""
    dtype: str = "float32"
    """Parameter/compute dtype: float32 | bfloat16 | float16."""
    transformer_impl: str = "auto"
    """Layer spec: local | transformer_engine | auto (TE when importable and on GPU)."""
    make_vocab_size_divisible_by: int = 128
    """Vocab is padded to a multiple of this times TP (Megatron convention)."""
    recompute_granularity: Optional[str] = None
    """Megatron activation recomputation: None | full | selective."""
    attention_dropout: float = 0.0
    """Dropout inside attention (0 for RL fine-tuning)."""
    hidden_dropout: float = 0.0
    """Dropout on hidden states (0 for RL fine-tuning)."""
    rope_theta: Optional[float] = None
    """Override of config.json's RoPE base, for the trainer and the SGLang servers alike;
    null = the checkpoint's."""
    max_position_embeddings: Optional[int] = None
    """Override of config.json's context length (trainer and SGLang alike); null = the
    checkpoint's. Going past the trained length usually comes with a larger rope_theta."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: Optional[int] = None
    """Data-parallel size; None = world_size // (tp * pp)."""
    cp: int = 1
    """Context-parallel size (passed to Megatron; GPU only)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    pp_layer_split: Optional[list] = None
    """Uneven pipeline split: number of layers per stage, e.g. [3, 5]."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over DP ranks (Megatron DistributedOptimizer) when dp > 1."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo) | nccl | gloo."""
    timeout_s: float = 1800.0
    """Timeout of the training collectives (NCCL watchdog / gloo)."""
    wait_timeout_s: float = 7200.0
    """How long ranks wait (on a gloo group, not NCCL) while rank 0 generates and scores a
    step's rollouts; long responses take minutes."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """jsonl / parquet / arrow file or a datasets save_to_disk directory; None = embedded task."""
    prompt_key: str = "prompt"
    """Field holding the problem text."""
    demo_key: str = "demonstration"
    """Field holding the expert demonstration (reasoning + final answer)."""
    answer_key: str = "answer"
    """Field holding the reference answer used by the reward."""
    template: str = "tokenizer"
    """Chat template: tokenizer | think (the paper's <think> template) | plain."""
    max_prompt_len: int = 256
    """Prompts longer than this (tokens) are filtered out."""
    max_response_len: int = 256
    """Maximum rollout length; demonstrations longer than this are filtered out."""
    shuffle_seed: int = 1234
    """Seed of the deterministic epoch shuffle."""


SGLANG_MEM_FRACTION = {"dedicated": 0.85, "colocated": 0.6}
"""Default SGLang --mem-fraction-static by placement: a dedicated GPU holds only the server
(the rest is its CUDA graphs and activations); a colocated server shares its GPU with the
trainer's resident weights and optimizer state."""


def sglang_mem_fraction(value: Optional[float], colocated: bool) -> float:
    """``rollout.mem_fraction`` (or srft-plan's ``--sglang-mem-fraction``), null = the
    placement's default."""
    return value if value is not None else SGLANG_MEM_FRACTION[
        "colocated" if colocated else "dedicated"]


@dataclass
class RolloutConfig:
    n_samples: int = 8
    """Rollouts per prompt (G in the paper)."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the trainer's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    urls: Optional[list] = None
    """Attach to running SGLang servers instead of launching them (e.g. servers on other
    nodes: ["http://node3:30000", ...]); the weight sync reaches each of them."""
    router: bool = False
    """Start an sglang-router on rank 0 (127.0.0.1) in front of the servers: /generate goes
    through it instead of the client-side balancing; the weight sync still goes to every
    server directly. Not with seeded rollouts (the router drops their per-request seeds)."""
    router_url: Optional[str] = None
    """Send /generate to this running sglang-router instead of launching one; rollout.urls
    must list the servers behind it (each gets the weight sync)."""
    router_policy: str = "cache_aware"
    """Routing policy of a launched router: cache_aware | round_robin | random | power_of_two."""
    sync_address: Optional[str] = None
    """Address of this trainer node that the servers dial for weight_sync=distributed: null =
    127.0.0.1 when every server URL is on loopback, else auto; auto = the address of the
    interface that reaches the servers (else the host name's); the environment variable
    SRFT_SYNC_ADDR, when set, wins (one value per node)."""
    num_servers: int = 1
    """SGLang servers to launch when urls is None."""
    server_tp: int = 1
    """SGLang tensor parallelism per server (GPU)."""
    weight_sync: str = "auto"
    """Weight sync mode: auto | distributed | tensor | disk."""
    bucket_mb: int = 256
    """Weight sync bucket size in MiB."""
    mem_fraction: Optional[float] = None
    """SGLang --mem-fraction-static of launched GPU servers (weights + KV cache as a fraction
    of the GPU): null = by placement, 0.85 on dedicated GPUs, 0.6 colocated with the trainer
    (weight_sync=tensor); srft-plan sizes the KV cache with the same values."""
    startup_timeout_s: float = 300.0
    """Seconds to wait for a server's /health before failing with its log tail."""
    request_timeout_s: float = 600.0
    """Seconds before a /generate request counts as hung."""
    max_concurrency: int = 64
    """Generate requests in flight per server."""
    overlap: bool = False
    """Generate step k+1's rollouts (with the weights before step k) while step k trains:
    one step off-policy (logged as rollout/policy_lag_*; algorithm.tis_cap corrects it)."""
    seeded: bool = False
    """Reproducible rollouts: each sample drawn with its own seed (Gumbel-max on the server);
    a resumed run regenerates the same rollouts. No top_p; slower for large vocabularies."""


@dataclass
class RewardConfig:
    fn: str = "math"
    """Reward: a registered name (math: \\boxed{} answer checked by math-verify) or
    'module:function' with signature fn(response, answer, prompt) -> float."""


@dataclass
class AlgorithmConfig:
    name: str = "srft"
    """sft | grpo | luffy | srft | srft_no_wsft | srft_no_wrl. Fields left null take this
    algorithm's default from srft_mcore/algo/defaults.py (table in the README)."""
    demo_in_group: bool = True
    """The demonstration joins its prompt's group for the advantage (Eq. 7)."""
    adv_std_norm: Optional[bool] = None
    """Divide group-centred rewards by the group std (null: per algorithm; LUFFY: off)."""
    c_sft: float = 0.5
    """Constant of w_SFT = c_sft * exp(sft_entropy_sign * H) (Eq. 8)."""
    sft_entropy_sign: float = -1.0
    """Sign s in w_SFT = c_sft * exp(s * H); the paper writes -1."""
    c_rl: float = 0.1
    """Constant of w_RL = c_rl * exp(H) on positive rollouts (Eq. 12)."""
    fixed_weight: float = 1.0
    """The weight the ablations fix: w_SFT for srft_no_wsft, w_RL for srft_no_wrl."""
    offpolicy_shaping: Optional[str] = None
    """Off-policy demo term shaping f(p): none | luffy (p / (p + gamma)); null: per algorithm."""
    shaping_gamma: float = 0.1
    """gamma of the LUFFY shaping."""
    entropy_weighting: str = "batch"
    """Entropy in w_SFT / w_RL: batch (one detached mean per step, from the old-policy pass;
    the paper) | token (per-token H_t, capped by token_weight_cap)."""
    entropy_tokens: str = "rollout"
    """Tokens whose mean entropy is the step's H: rollout (the policy's own samples) |
    demo | all."""
    token_weight_cap: float = 1.0
    """Upper bound of per-token w_SFT and w_RL (0.1 * exp(H_t) is unbounded; H_t <= ln V)."""
    loss_agg: Optional[str] = None
    """token-mean | seq-mean-token-mean | seq-sum-max-len; null: per algorithm."""
    onpolicy_form: Optional[str] = None
    """SRFT on-policy term: sign (Eq. 11: advantage +1 with w_RL on positive, -1 on negative
    rollouts) | ppo (Eq. 7 advantages); both through the clipped ratio to the old policy."""
    clip_eps: Optional[float] = None
    """PPO ratio clip epsilon (acts from the second mini-batch on); null: per algorithm;
    a negative value turns clipping off."""
    entropy_coef: Optional[float] = None
    """Entropy bonus coefficient (LUFFY 0.001; the paper 0); null: per algorithm."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling: rollout-token losses times min(pi_old / pi_sglang, cap),
    correcting the training-inference mismatch (needs unseeded rollouts); null = off."""
    kl_coef: float = 0.0
    """KL penalty to a frozen reference policy (the start weights); 0 = off (the paper)."""
    kl_estimator: str = "k3"
    """KL estimator on rollout tokens: k1 (log pi - log pi_ref) | k3 (unbiased, >= 0)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of a decaying schedule."""
    lr_schedule: str = "constant"
    """constant | cosine | linear."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    max_consecutive_skips: int = 5
    """Stop after this many non-finite steps in a row (float16: overflows at the smallest
    loss scale, optimizer.min_loss_scale)."""
    initial_loss_scale: float = 65536.0
    """float16 only: start value of Megatron's dynamic loss scale (2^16; Megatron-LM's 2^32
    would skip 17 optimizer steps, and their rollouts, just to come down to 2^16)."""
    min_loss_scale: float = 1.0
    """float16 only: the dynamic loss scale never goes below this."""
    loss_scale_window: int = 1000
    """float16 only: the loss scale doubles after this many optimizer steps without overflow."""
    hysteresis: int = 2
    """float16 only: the loss scale halves from the hysteresis-th overflow on, counted since
    the start or its last doubling (every overflow skips its optimizer step)."""


@dataclass
class TrainConfig:
    steps: int = 500
    """Optimizer steps."""
    prompts_per_step: int = 128
    """Prompts sampled per step (global)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per DP rank."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Pack sequences into rows of at most this many tokens (balanced bins, attention kept
    inside each sequence) instead of micro_batch_size padded rows; null = padded."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch: prompts_per_step / mini-batch (the paper: 128 / 64
    = 2). Mini-batches after the first are off-policy (ratio to the old log-probs)."""
    seed: int = 1234
    """Global seed (model init, data order, sampling)."""
    deterministic: bool = False
    """Deterministic algorithms (for exact resume checks on CPU)."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; None = <run_dir>/checkpoints."""
    every: int = 50
    """Save every K steps (and at the end)."""
    keep: int = 2
    """Checkpoints kept (older ones deleted after a successful save)."""
    resume: bool = False
    """Continue from the latest checkpoint in dir."""
    export_hf: bool = True
    """Export the final policy as a HF checkpoint."""


@dataclass
class EvalConfig:
    every: int = 0
    """Score the held-out splits every K steps (and at the end) through the live rollout
    servers; 0 = off."""
    splits: Optional[dict] = None
    """name -> eval file (srft-eval layouts); null with the embedded task = its shipped
    in-distribution (id) and longer-chain out-of-distribution (ood) splits."""
    n_samples: int = 1
    """Samples per problem (avg@k)."""
    temperature: float = 0.6
    """Evaluation sampling temperature (the paper: 0.6)."""
    max_new_tokens: Optional[int] = None
    """Generation limit; null = data.max_response_len."""
    limit: Optional[int] = None
    """Score only the first N problems of each split (faster curves)."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/srft"
    """Where metrics, plots, checkpoints and exports go."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb_project: Optional[str] = None
    """Log to Weights & Biases when set and wandb is installed."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "model.recompute_granularity": (None, "full", "selective"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "data.template": ("tokenizer", "think", "plain"),
    "rollout.weight_sync": ("auto", "distributed", "tensor", "disk"),
    "rollout.router_policy": ("cache_aware", "round_robin", "random", "power_of_two"),
    "algorithm.name": ("sft", "grpo", "luffy", "srft", "srft_no_wsft", "srft_no_wrl"),
    "algorithm.offpolicy_shaping": (None, "none", "luffy"),
    "algorithm.onpolicy_form": (None, "sign", "ppo"),
    "algorithm.entropy_weighting": ("token", "batch"),
    "algorithm.entropy_tokens": ("rollout", "demo", "all"),
    "algorithm.loss_agg": (None, "token-mean", "seq-mean-token-mean", "seq-sum-max-len"),
    "algorithm.kl_estimator": ("k1", "k3"),
    "optimizer.lr_schedule": ("constant", "cosine", "linear"),
}


# --------------------------------------------------------------------------- loading
def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise _err(key, value, f"expected {name}, got {type(value).__name__}",
               f"give a {name} value, e.g. {key}=<{name}>")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise _err(prefix.rstrip("."), data, "expected a mapping",
                   f"write '{prefix.rstrip('.')}:' as a YAML mapping of its fields")
    ftypes = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in ftypes:
            known = ", ".join(sorted(ftypes))
            raise _err(full, value, "unknown key", f"use one of: {known}")
        typ = ftypes[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(full, value, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise _err(dotted, value, f"'{p}' is not a section", "override a leaf key")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> (``a.b.c``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} has no '='. Fix: write key=value, "
                          f"e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Read ``path`` (YAML; None = defaults) and apply ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config error: config file {path!r} does not exist. "
                              f"Fix: pass --config with a YAML file (see examples/configs/)")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config error: {path} is not valid YAML: {e}") from None
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    if cfg.algorithm.name in CHOICES["algorithm.name"]:  # else validate() names the problem
        from srft_mcore.algo.defaults import resolve

        cfg.algorithm = resolve(cfg.algorithm)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# --------------------------------------------------------------------------- validation
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
    from srft_mcore.models.builder import context_limit, with_overrides

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
    if r.mem_fraction is not None and not 0 < r.mem_fraction < 1:
        raise _err("rollout.mem_fraction", r.mem_fraction, "must be in (0, 1)",
                   "use e.g. 0.85 on dedicated GPUs, 0.6 colocated, or null for these defaults")


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
    a = cfg.algorithm
    if a.tis_cap is not None and a.tis_cap <= 0:
        raise _err("algorithm.tis_cap", a.tis_cap, "must be > 0", "use e.g. 2.0, or null (off)")
    if a.tis_cap is not None and cfg.rollout.seeded:
        raise _err("algorithm.tis_cap", a.tis_cap, "seeded rollouts report the log-probs of "
                   "the Gumbel-perturbed logits, not the sampling policy's",
                   "set rollout.seeded=false, or algorithm.tis_cap=null")
    if a.kl_coef < 0:
        raise _err("algorithm.kl_coef", a.kl_coef, "must be >= 0", "use 0 (off) or e.g. 0.001")
    if a.token_weight_cap <= 0:
        raise _err("algorithm.token_weight_cap", a.token_weight_cap, "must be > 0",
                   "use e.g. 1.0")
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
    if cfg.eval.every < 0:
        raise _err("eval.every", cfg.eval.every, "must be >= 0", "use 0 (off) or a step count")
    if cfg.eval.every and cfg.eval.splits is None and cfg.data.path is not None:
        raise _err("eval.splits", None, "eval.every is set but no held-out files are given",
                   "add eval.splits: {name: FILE.jsonl, ...} (srft-eval layouts)")
    if cfg.rollout.overlap and cfg.rollout.weight_sync == "tensor":
        raise _err("rollout.overlap", True, "colocated servers (weight_sync=tensor) release "
                   "their GPU memory while the trainer runs, so they cannot generate then",
                   "use dedicated rollout GPUs (weight_sync=distributed) or rollout.overlap=false")
    _check_rollout_endpoints(cfg.rollout)
    if cfg.rollout.temperature <= 0:
        raise _err("rollout.temperature", cfg.rollout.temperature, "must be > 0 for RL rollouts",
                   "use a positive temperature (the paper uses 1.0)")

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


def describe(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)
