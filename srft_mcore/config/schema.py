"""The run configuration's sections: one dataclass per YAML section, each field with its
default and a one-line docstring (the string literal under it), and ``CHOICES``, the allowed
values of the fields that take one."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    hf_path: Optional[str] = None
    """HF model directory (config.json + tokenizer); None = the embedded tiny model."""
    load_hf_weights: bool = True
    """Load the weights from hf_path's safetensors at start-up (else random init)."""
    load_mcore: Optional[str] = None
    """A Megatron dist_checkpointing directory to start from instead of HF weights."""
    load_optimizer: bool = False
    """With load_mcore a trainer checkpoint: also take its optimizer state (Adam moments and
    step counts; the lr schedule is this run's), e.g. SFT->RL's RL run after its SFT run."""
    dtype: str = "float32"
    """Parameter/compute dtype: float32 | bfloat16 | float16."""
    transformer_impl: str = "auto"
    """Layer spec: local | transformer_engine | auto (TE when importable and on GPU)."""
    make_vocab_size_divisible_by: int = 128
    """Vocab is padded to a multiple of this times TP (Megatron convention)."""
    recompute_granularity: Optional[str] = None
    """Megatron activation recomputation: None | full | selective."""
    loss_in_kernel: bool = True
    """Form the training loss's gradient inside the fused output-layer kernel, one chunk of
    tokens at a time in the forward: three output-layer matmuls instead of four (the logits
    are never recomputed). Every built-in algorithm's loss is a sum of per-token terms, which
    this needs; false: the kernel returns log-probs and entropies and autograd runs the loss."""
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
class DemoQualityConfig:
    """data.demo_quality: corruption of the training demonstrations (srft_mcore/data/
    demo_quality.py), a pure function of the records, these fields and seed."""
    wrong_fraction: float = 0.0
    """Fraction of demonstrations (rounded half up) replaced by a well-formed wrong one."""
    wrong_kind: str = "auto"
    """slip (an arithmetic slip carried through an embedded-task chain) | swap (another
    problem's demonstration, with a different answer) | auto (slip when every demonstration
    is an embedded-task chain, else swap)."""
    truncate_fraction: float = 0.0
    """Fraction of the other demonstrations cut at a seeded character position before the
    final answer."""
    source: Optional[str] = None
    """Read demonstrations from this file instead (data.prompt_key / data.demo_key fields, the
    formats data.path accepts), matched to the training records by exact prompt text."""
    source_missing: str = "error"
    """A training prompt the source file lacks: error | keep (its own demonstration)."""
    seed: int = 0
    """Seed of the corruption: fixed (not data.shuffle_seed, which a comparison varies per
    run), so every method and train seed corrupts the same demonstrations."""


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
    demo_quality: DemoQualityConfig = field(default_factory=DemoQualityConfig)
    """Deliberately imperfect demonstrations (training data only), for robustness studies."""
    verify_demos: bool = False
    """Score each demonstration with reward.fn against its answer (a wrong one gets reward 0
    in its group) instead of trusting it as reward 1; false: the paper's trusted expert."""


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
    reattach_timeout_s: float = 300.0
    """Seconds to wait for a server attached by URL (rollout.urls) that stopped answering
    to come back (it is not ours to restart); after that the run saves its checkpoint and
    stops, saying how to resume."""
    request_timeout_s: float = 600.0
    """Seconds before a /generate request counts as hung."""
    max_concurrency: int = 64
    """Generate requests in flight per server."""
    overlap: bool = False
    """Generate step k+1's rollouts (with the weights before step k) while step k trains:
    one step off-policy (logged as rollout/policy_lag_*). Corrected the decoupled way by
    default (algorithm.tis_cap becomes 2.0 when null, with unseeded rollouts: seeded ones
    report no behaviour log-probs, so their lag stays uncorrected)."""
    seeded: bool = False
    """Reproducible rollouts: each sample drawn with its own seed (Gumbel-max on the server);
    a resumed run regenerates the same rollouts. No top_p; slower for large vocabularies."""
    offload: str = "auto"
    """Colocated servers (weight_sync=tensor): what the trainer moves to pinned host memory
    while they generate: none | state (gradient buffers, Adam state, fp32 master weights) |
    all (and the weights) | auto (state when colocated on CUDA, else none)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all one value (no
    group-relative advantage) and draw more prompts, one further rollout call per round,
    until train.prompts_per_step groups are kept or max_resample_rounds further rounds ran;
    short: the kept groups plus reused dropped ones up to a multiple of train.mini_batches x
    DP (srft_mcore/training/dynamic_sampling.py). Logged as dynamic/*. Not with sft."""
    dynamic_sampling_count_demo: Optional[bool] = None
    """The demonstration's reward (1) joins its group's for that test, so only groups whose
    rollouts all score 1 are dropped (an all-wrong group keeps its demonstration's advantage);
    null: on for luffy and the srft variants, which train the demonstration through its group."""
    max_resample_rounds: int = 3
    """rollout.dynamic_sampling: further rounds after the first, at most (0: filter only)."""


@dataclass
class RewardConfig:
    fn: str = "math"
    """Reward: a registered name (math: \\boxed{} answer checked by math-verify) or
    'module:function' with signature fn(response, answer, prompt) -> float."""
    workers: int = 2
    """Processes that score the rewards (rank 0), each answer within timeout_s; 0: in the
    trainer's process, no time limit (a hanging answer stalls every rank). 2: scoring is
    cheap next to generation, and a second worker keeps the batch going while one is stuck
    on an answer."""
    timeout_s: float = 10.0
    """Seconds one answer may take in a worker before it is killed, replaced and the answer
    scores 0 (counted as reward/timeouts). 10: above the worst case of the math reward that
    still ends (math-verify gives up after 3 s on each of parsing the answer, parsing the
    response and comparing them)."""


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
    """token-mean | seq-mean-token-mean (DeepSeekMath's per-sequence mean) | sum-max-len
    (LUFFY's: token sum / data.max_response_len) | seq-sum-max-len (that also divided by the
    sequence count); null: per algorithm (GRPO: token-mean, verl's default)."""
    onpolicy_form: Optional[str] = None
    """SRFT on-policy term: sign (Eq. 11: advantage +1 with w_RL on positive, -1 on negative
    rollouts) | ppo (Eq. 7 advantages); both through the clipped ratio to the old policy."""
    clip_eps: Optional[float] = None
    """PPO ratio clip epsilon (acts from the second mini-batch on); null: per algorithm;
    a negative value turns clipping off."""
    clip_eps_low: Optional[float] = None
    """Decoupled clip (DAPO's clip-higher): the ratio is clamped to [1 - clip_eps_low,
    1 + clip_eps_high]; null: clip_eps (both null: clip_eps's symmetric clip)."""
    clip_eps_high: Optional[float] = None
    """Upper side of the decoupled clip (DAPO: 0.28 with clip_eps_low 0.2); null: clip_eps."""
    entropy_coef: Optional[float] = None
    """Entropy bonus coefficient (LUFFY 0.001; the paper 0); null: per algorithm."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling: rollout-token losses times min(pi_old / pi_sglang, cap)
    (pi_old: the old-policy pass, the proximal policy of the PPO ratio; pi_sglang: the
    policy that sampled), correcting the training-inference mismatch and, under
    rollout.overlap, the one-step lag (the decoupled objective). Needs unseeded rollouts.
    null: 2.0 under rollout.overlap, else off; a negative value: off."""
    kl_coef: float = 0.0
    """KL penalty to a frozen reference policy (the start weights); 0 = off (the paper)."""
    kl_estimator: str = "k3"
    """KL estimator on rollout tokens: k1 (log pi - log pi_ref) | k3 (unbiased, >= 0)."""
    weight_schedule: str = "exp"
    """Where w_SFT / w_RL come from (srft_mcore/algo/weight_schedule.py): exp (the paper's,
    from H per entropy_weighting) | ema (the paper's form at an average of the step entropy)
    | ema2 (at a slow average plus entropy_trend_gain times the fast-minus-slow trend) |
    target (integral control towards target_entropy) | fixed (both = fixed_weight). Not
    exp: one weight per step; only for the srft algorithms."""
    entropy_ema_halflife: float = 10.0
    """ema / ema2: half-life in steps of the (fast) entropy average; decay 0.5 ** (1 / it)."""
    entropy_ema_slow_halflife: float = 50.0
    """ema2: half-life in steps of the slow entropy average (> entropy_ema_halflife)."""
    entropy_trend_gain: float = 2.0
    """ema2: k in h_eff = h_slow + k (h_fast - h_slow) (0: slow only, 1: fast only)."""
    target_entropy: Optional[float] = None
    """target: the step entropy (nats) the controller holds; null: the first step's (the
    start policy's entropy on the training prompts)."""
    target_gain: float = 0.2
    """target: log w_RL moves by target_gain * (H - target_entropy) per step, log w_SFT
    the opposite way."""
    weight_min: float = 0.01
    """ema2 / target: lower bound of both weights (0: none)."""
    weight_max: float = 1.0
    """ema2 / target: upper bound of both weights."""


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
    validation split (val), in-distribution (id) and four-step-chain out-of-distribution
    (ood) splits."""
    at_start: bool = True
    """Also score the start policy (step 0)."""
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
    "algorithm.loss_agg": (None, "token-mean", "seq-mean-token-mean", "sum-max-len",
                           "seq-sum-max-len"),
    "algorithm.kl_estimator": ("k1", "k3"),
    "algorithm.weight_schedule": ("exp", "ema", "ema2", "target", "fixed"),
    "optimizer.lr_schedule": ("constant", "cosine", "linear"),
}

