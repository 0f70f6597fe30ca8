"""The single-stage SRFT trainer: one step = rollout -> reward -> advantages -> train -> sync.

Launched with torchrun (``srft-train --config FILE [a.b=c ...]``); every rank runs this
loop. Rank 0 owns the SGLang servers and the reward; the step's prompts, rollouts and
rewards are broadcast so all ranks build the same sequences, and each DP rank trains on
its share through Megatron's forward-backward schedule with the fused SRFT loss.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from srft_mcore.training import checkpoint as ckpt
from srft_mcore.training.batching import build_sequences
from srft_mcore.config import Config, ConfigError, load_config, save_config, validate
from srft_mcore.launching.distributed import broadcast_object


ENTROPY_GRID = 2.0 ** 24


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. gradients non-finite K times in a row); one paragraph."""


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[srft]", *args, flush=True)


# --------------------------------------------------------------------------- set-up
def resolve_model_dir(cfg: Config) -> str:
    """The HF directory to start from: model.hf_path, or the embedded tiny model (shipped,
    built by tools/make_embedded_model.py)."""
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    return cfg.model.hf_path or EMBEDDED_MODEL_DIR


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = os.path.abspath(cfg.logging.run_dir)
        self.ckpt_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(self.run_dir,
                                                                            "checkpoints"))
        self.step = 0
        self.rollout_calls = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.overflow_steps = 0  # float16: optimizer steps the loss-scale overflow skipped
        self.engine = None
        self.pending = None  # rollout.overlap: the next step's batch, made during this step
        self.eval_splits = {}
        self.ahead = None

    # ------------------------------------------------------------------ building
    def init_policy(self):
        """Process groups, the policy (model, DDP, optimizer, scheduler), no data or SGLang.

        The start weights (HF or ``model.load_mcore``) are loaded before the optimizer is
        built: a mixed-precision optimizer clones fp32 master weights at construction, and
        a later load would be undone by its first step.
        """
        self._init_groups()
        return self._init_model()

    def _init_groups(self):
        """Process groups, the model's HF config and tokenizer, the checked config."""
        from srft_mcore.launching.distributed import init_distributed
        from srft_mcore.models import load_hf_config
        from srft_mcore.models.tiny import load_tokenizer

        cfg = self.cfg
        p = cfg.parallel
        self.layout = init_distributed(tp=p.tp, pp=p.pp, cp=p.cp, backend=p.backend,
                                       seed=cfg.train.seed, timeout_s=p.timeout_s,
                                       wait_timeout_s=p.wait_timeout_s)
        from srft_mcore.models.builder import with_overrides

        self.model_dir = resolve_model_dir(cfg)
        # model.rope_theta / max_position_embeddings: one config for the model, SGLang, export
        self.hf = with_overrides(load_hf_config(self.model_dir), cfg.model)
        validate(cfg, world_size=self.layout.world_size, hf_config=self.hf)
        self.tokenizer = load_tokenizer(self.model_dir)

    def _init_model(self):
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        p = cfg.parallel
        model = self._build_start_model(ddp=True)
        use_distopt = p.use_distributed_optimizer and self.layout.dp > 1
        # the schedule then all-reduces DP grads, tied embedding grads across PP stages and
        # sequence-parallel norm grads after the last micro-batch (Megatron-LM training.py)
        model.config.finalize_model_grads_func = finalize_model_grads
        self.model = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=use_distopt), module=model)
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr,
                            weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
                            adam_beta2=o.adam_beta2, clip_grad=o.grad_clip,
                            use_distributed_optimizer=use_distopt,
                            bf16=cfg.model.dtype == "bfloat16",
                            # float16: fp32 main params and a dynamic loss scaler (loss_scale
                            # None); optimizer.step() unscales, checks and skips overflows
                            fp16=cfg.model.dtype == "float16", loss_scale=None,
                            initial_loss_scale=o.initial_loss_scale,
                            min_loss_scale=o.min_loss_scale,
                            loss_scale_window=o.loss_scale_window, hysteresis=o.hysteresis,
                            params_dtype=model.config.params_dtype), [self.model])
        if cfg.model.dtype == "float16":  # the schedule's backward starts from the scaled loss
            model.config.grad_scale_func = self.optimizer.scale_loss
        # the schedule counts optimizer steps: mini_batches per training step
        k = cfg.train.mini_batches
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps * k, lr_decay_steps=max(cfg.train.steps * k, 1),
            lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(cfg.train.steps * k, 1), wd_incr_style="constant")
        self.ref_model = None
        if cfg.algorithm.kl_coef > 0:  # frozen start policy, same sharding, no optimizer
            self.ref_model = self._build_start_model(quiet=True)
            self.ref_model.eval()
            for param in self.ref_model.parameters():
                param.requires_grad_(False)
        return self

    def _build_start_model(self, quiet: bool = False, ddp: bool = False):
        """A GPTModel stage holding the start weights: model.load_mcore, else HF. ddp: the
        trained policy (wrapped in Megatron's DDP), not the frozen reference."""
        from srft_mcore.models.bridge import load_hf_into_model
        from srft_mcore.models import build_model

        cfg = self.cfg
        model = build_model(self.hf, cfg.model, cfg.parallel, ddp=ddp)
        if cfg.model.load_mcore:  # e.g. the RL stage of SFT->RL starts from the SFT run
            kind = ckpt.load_model_weights(cfg.model.load_mcore, model, self.hf)
            if not quiet:
                log0(f"loaded model weights from the {kind} {cfg.model.load_mcore}")
        elif cfg.model.load_hf_weights:
            load_hf_into_model(model, self.model_dir, self.hf, tp_group=self.layout.tp_group)
        return model

    def setup(self):
        from srft_mcore.data import (EMBEDDED_TASK, PromptSampler, build_dataset,
                                     held_out_prompts, write_embedded_dataset)
        from srft_mcore.reward import get_reward_fn

        cfg = self.cfg
        # everything that can be wrong with the input is checked before heavy work
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and world > 1 and "RANK" not in os.environ:
            raise ConfigError("WORLD_SIZE is set without RANK: launch with torchrun")
        # one trainer per run directory, checked first: rank 0 holds the lock until it exits
        # (if it is refused, torchrun stops the other ranks, still waiting at the rendezvous)
        from srft_mcore.training.lifecycle import lock_run_dir

        self.run_lock = lock_run_dir(self.run_dir) if os.environ.get("RANK", "0") == "0" else None
        self._refuse_to_overwrite()
        os.makedirs(self.run_dir, exist_ok=True)
        self._init_groups()
        from srft_mcore.rollout.engine import check_attached_servers

        # servers given by URL that cannot take the weight sync are refused now, not after
        # the model is built (launched servers: once they are up, still before step 1)
        check_attached_servers(cfg.rollout, group=self.layout.cpu_group)
        data_cfg = cfg.data
        if data_cfg.path is None:  # the embedded task, written once by rank 0
            data_cfg = dataclasses.replace(data_cfg, path=os.path.join(self.run_dir,
                                                                       "embedded_task.jsonl"))
            if self.layout.rank == 0 and not os.path.isfile(data_cfg.path):
                write_embedded_dataset(data_cfg.path, n=2000, seed=cfg.train.seed,
                                       exclude=held_out_prompts(), **EMBEDDED_TASK)
            dist.barrier(group=self.layout.cpu_group)
        self.dataset = build_dataset(data_cfg, self.tokenizer, run_dir=self.run_dir,
                                     require_demo=cfg.algorithm.name != "grpo", report=log0)
        self.sampler = PromptSampler(len(self.dataset), cfg.train.prompts_per_step,
                                     seed=cfg.data.shuffle_seed)
        self.reward_fn = get_reward_fn(cfg.reward.fn)
        self.eval_splits = self._load_eval_splits()
        self._init_model()

        ckpt.clean_stale(self.ckpt_dir)
        self.resumed = False
        if cfg.checkpoint.resume:
            self.resume()
        if self.layout.rank == 0:  # after a resume has read its checkpoint: a failed one
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))  # changes nothing
        self.start_rollout()
        return self

    def _load_eval_splits(self) -> dict:
        """The held-out splits of ``eval``, checked now (bad files fail before training).
        The embedded task ships two (``id``: two-step problems its training data never
        contains; ``ood``: three-step chains), see :func:`srft_mcore.data.embedded_eval_splits`."""
        from srft_mcore.data import embedded_eval_splits
        from srft_mcore.evaluation.evaluate import load_eval_set

        ev = self.cfg.eval
        if not ev.every:
            return {}
        # no eval.splits: the embedded task's (validate() requires them for user data)
        splits = dict(ev.splits or {}) or embedded_eval_splits()
        return {name: load_eval_set(path, name=name, limit=ev.limit)
                for name, path in splits.items()}

    def evaluate(self) -> dict:
        """Score the held-out splits through the live rollout servers (rank 0; every rank
        gets the result), ``eval/<split>/acc``."""
        from srft_mcore.evaluation.evaluate import evaluate_splits, paper_sampling
        from srft_mcore.rollout.seeded import mix_seed

        cfg, out = self.cfg, None
        if self.layout.rank == 0:
            seed = mix_seed(cfg.train.seed, 0xE7A1, self.step) if cfg.rollout.seeded else None
            sampling = paper_sampling(
                seed=seed, temperature=cfg.eval.temperature,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_response_len)
            out = evaluate_splits(self.engine.client, self.tokenizer, self.eval_splits,
                                  template=cfg.data.template, sampling=sampling,
                                  n_samples=cfg.eval.n_samples,
                                  out_dir=os.path.join(self.run_dir, "eval",
                                                       f"step_{self.step:06d}"))
        return broadcast_object(out, self.layout.cpu_group)

    def _refuse_to_overwrite(self):
        """A fresh run never replaces an earlier run's metrics or checkpoints."""
        if self.cfg.checkpoint.resume:
            return
        earlier = [p for p in (os.path.join(self.run_dir, "metrics.jsonl"),
                               os.path.join(self.ckpt_dir, "latest")) if os.path.isfile(p)]
        if earlier:
            raise ConfigError(
                f"config error: logging.run_dir={self.run_dir!r} already holds a run "
                f"({', '.join(earlier)}). Fix: add --resume to continue it, or choose a new logging.run_dir "
                f"(and checkpoint.dir); nothing was changed")

    def resume(self):
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            log0(f"checkpoint.resume=true but no checkpoint in {self.ckpt_dir}: starting fresh")
            return
        state = ckpt.load_checkpoint(path, self.model.module, self.optimizer)
        self.step = state["step"]
        self.rollout_calls = state["rollout_calls"]
        self.skipped_total = state["skipped_total"]
        self.overflow_steps = state.get("overflow_steps", 0)  # (the loss scaler: optimizer state)
        self.sampler.load_state_dict(state["sampler"])
        self.pending = pending_from_json(state.get("pending"))
        self.scheduler.load_state_dict(state["scheduler"])
        log0(f"resumed from {path} at step {self.step}")
        self.resumed = True

    def start_rollout(self):
        from srft_mcore.rollout.engine import RolloutEngine

        from srft_mcore.rollout.server import context_server_args

        self.engine = RolloutEngine.launch(self.cfg.rollout, model_path=self.model_dir,
                                           server_args=[*context_server_args(self.cfg, self.hf),
                                                        "--dtype", self.cfg.model.dtype],
                                           layout=self.layout, hf_config=self.hf,
                                           work_dir=os.path.join(self.run_dir, "rollout"),
                                           group=self.layout.cpu_group)
        if self.step > 0 or self.cfg.model.load_mcore or self.cfg.rollout.overlap:
            # the servers start from the HF weights on disk: give them the policy's (and,
            # overlapped, a version tag from the first sample on, for the lag metric); a
            # resumed run does so before its first rollout
            error = self.sync_or_error()
            if error is not None:
                raise self.sync_stopped(error)

    def sync_or_error(self):
        """Push the policy to the servers (the engine retries a failed sync); returns the
        ``WeightSyncError`` of a sync that failed for good, else None. Collective."""
        from srft_mcore.rollout.weight_sync import WeightSyncError

        try:
            self.engine.sync_weights(self.model.module, version=str(self.step))
        except WeightSyncError as e:
            return e
        return None

    def sync_stopped(self, error, saved=None) -> TrainingStopped:
        """The paragraph a run stops with when a weight sync failed for good: which server
        and route, the checkpoint that keeps the trained step (``saved``), how to resume."""
        failed = ", ".join(dict.fromkeys(f"{u}{r}" for u, r in error.where)) or \
            f"the servers {', '.join(self.engine.urls)}"
        kept = (f"The trained step is saved in {saved}" if saved else
                f"Nothing changed (the checkpoint of step {self.step} is untouched)")
        return TrainingStopped(
            f"step {self.step}: the weight sync to SGLang (rollout.weight_sync="
            f"{self.engine.mode}) failed for good at {failed}: {error}. {kept}. Fix: check that "
            f"server (its log; restart it, or list another in rollout.urls), then resume with: "
            f"{resume_command(self.run_dir)} (overrides such as rollout.urls=[...] may follow "
            f"--config); it syncs the saved weights to the servers before its first rollout")

    # ------------------------------------------------------------------ one step
    def _sampling(self):
        """The next rollout call's sampling parameters (a fresh seed per call)."""
        from srft_mcore.rollout.client import SamplingParams
        from srft_mcore.rollout.seeded import mix_seed

        cfg = self.cfg
        seed = mix_seed(cfg.train.seed, self.rollout_calls) if cfg.rollout.seeded else None
        self.rollout_calls += 1
        return SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_new_tokens=cfg.data.max_response_len,
                              stop_token_ids=[self.tokenizer.eos_token_id], seed=seed)

    def rollout(self, examples, sampling=None):
        """Rank 0 samples n continuations per prompt (collective; others get None)."""
        # seeded sampling decodes Gumbel-perturbed logits: their log-probs are not the policy's
        return self.engine.generate([ex.prompt_ids for ex in examples],
                                    n=self.cfg.rollout.n_samples,
                                    sampling=sampling or self._sampling(),
                                    return_logprob=not self.cfg.rollout.seeded)

    def _batch_now(self):
        """Draw the step's prompts, generate and score them now (every rank gets them)."""
        indices = self.sampler.next_batch()
        examples = self.dataset.batch(indices)
        groups = self.rollout(examples)
        rewards = self.score(examples, groups)
        # the other ranks wait here, on the gloo group with the long timeout
        groups, rewards = broadcast_object((groups, rewards), self.layout.cpu_group)
        return indices, groups, rewards

    # ------------------------------------------------------------------ overlapped rollout
    def _start_ahead(self):
        """rollout.overlap: draw the next step's prompts and generate them in a background
        thread on rank 0 with the weights the servers hold now, while this step trains."""
        import threading

        indices = self.sampler.next_batch()
        examples = self.dataset.batch(indices)
        sampling = self._sampling()
        box = {"indices": indices, "sampling": sampling}

        def work():
            try:
                groups = self.engine.client.generate(
                    [ex.prompt_ids for ex in examples], n=self.cfg.rollout.n_samples,
                    sampling=sampling, return_logprob=not self.cfg.rollout.seeded)
                self.engine._check_versions(groups)
                box["groups"], box["rewards"] = groups, self.score(examples, groups)
            except Exception as e:  # noqa: BLE001 - regenerated collectively in _finish_ahead
                box["error"] = f"{type(e).__name__}: {e}"

        if self.layout.rank == 0:
            box["thread"] = threading.Thread(target=work, name="rollout-ahead", daemon=True)
            box["thread"].start()
        self.ahead = box

    def _finish_ahead(self):
        """Join the background generation (collective) before the weights change; if it
        failed, generate the same prompts now with the same seed (the engine recovers dead
        servers), so the batch is the one an uninterrupted run would have drawn."""
        box, self.ahead = self.ahead, None
        if self.layout.rank == 0:
            box["thread"].join()
        error = broadcast_object(box.get("error"), self.layout.cpu_group)
        examples = self.dataset.batch(box["indices"])
        if error is None:
            groups, rewards = broadcast_object((box.get("groups"), box.get("rewards")),
                                               self.layout.cpu_group)
        else:
            log0(f"background rollout failed ({error}); generating the batch again")
            groups = self.rollout(examples, box["sampling"])
            rewards = self.score(examples, groups)
            groups, rewards = broadcast_object((groups, rewards), self.layout.cpu_group)
        return box["indices"], groups, rewards

    def score(self, examples, groups):
        rewards = None
        if self.layout.rank == 0:
            from srft_mcore.reward import score_batch

            rewards = [score_batch(self.reward_fn, [c.text for c in comps],
                                   [ex.answer] * len(comps), [ex.prompt] * len(comps))
                       for ex, comps in zip(examples, groups)]
        return rewards

    # ------------------------------------------------------------------ the training step
    def train_step(self, seqs) -> dict:
        """Train on one rollout batch (a list of :class:`TrainSequence`), as the paper does.

        1. Split it into ``train.mini_batches`` optimizer mini-batches of whole prompt groups.
        2. One no-grad pass of the policy that generated it (:meth:`old_policy_pass`): old
           log-probs, the step's entropy H (one scalar for every micro-batch and rank) and
           the training-inference mismatch against SGLang's log-probs.
        3. One optimizer step per mini-batch (:meth:`train_batch`); from the second on the
           policy has moved, so the ratio to the old log-probs is no longer 1 and clips.
        Returns the step's metrics on every rank.
        """
        from srft_mcore.training.batching import sequence_totals, split_mini_batches

        cfg = self.cfg
        k = cfg.train.mini_batches
        parts = [p for p in split_mini_batches(seqs, k, -(-self._n_groups(seqs) // k) * k) if p]
        minis = [self._micro_batches(part) for part in parts]
        record = self.old_policy_pass(minis)
        entropy = record["entropy/step"] if cfg.algorithm.entropy_weighting == "batch" else None
        updates = []
        for part, micro in zip(parts, minis):
            totals = sequence_totals(part, max_len=cfg.data.max_response_len,
                                     batch_entropy=entropy)
            updates.append(self.train_batch(micro, totals))
        self.last_updates = updates
        record.update(combine_updates(updates))
        return record

    @staticmethod
    def _n_groups(seqs) -> int:
        return max((s.group for s in seqs), default=-1) + 1

    def _micro_batches(self, seqs) -> list:
        """This DP rank's micro-batches of ``seqs``, on the layout's device."""
        from srft_mcore.training.batching import make_micro_batches

        p, t = self.cfg.parallel, self.cfg.train
        micro = make_micro_batches(seqs, t.micro_batch_size, self.layout.dp_rank,
                                   self.layout.dp, self.tokenizer.pad_token_id,
                                   pad_to_multiple=p.tp if p.sequence_parallel else 1,
                                   max_tokens=t.max_tokens_per_micro_batch)
        dev = self.layout.device
        return [{k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in mb.items()} for mb in micro]

    def _schedule(self, micro, forward_step, model, forward_only: bool) -> list:
        """Megatron's forward(-backward) schedule over ``micro`` (TP/PP/DP aware)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq_len = micro[0]["tokens"].shape[1]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=seq_len,
            micro_batch_size=micro[0]["tokens"].shape[0], decoder_seq_length=seq_len,
            forward_only=forward_only)

    def _policy_output(self, model, mb, entropy_grad: bool = False):
        from srft_mcore.models.policy import policy_forward

        packed = mb if self.cfg.train.max_tokens_per_micro_batch else None
        return policy_forward(model, mb["tokens"], mb["position_ids"], mb["targets"],
                              vocab_size=self.hf["vocab_size"], tp_group=self.layout.tp_group,
                              temperature=self.cfg.rollout.temperature,
                              entropy_grad=entropy_grad, packed=packed)

    @torch.no_grad()
    def old_policy_pass(self, minis: list) -> dict:
        """Forward the whole step batch once with the weights that generated it.

        Stores ``old_logprobs`` (and ``ref_logprobs`` with a KL penalty) on each micro-batch
        of the last pipeline stage, the same fused kernel as training so the first
        mini-batch's ratio is exactly 1. Returns ``entropy/step`` (mean entropy over
        ``algorithm.entropy_tokens``; all trained tokens when there are none) and the
        mismatch |log p_sglang - log p_megatron| over rollout tokens, on every rank.
        """
        from srft_mcore.algo.losses import _masked_metric, _max_metric, entropy_token_mask, \
            per_token, reduce_metrics

        def record_old(mb, output):
            logp_bs, ent_bs = output
            logp_bs = logp_bs.float()
            mb["old_logprobs"] = logp_bs
            mask_bs = mb["loss_mask"]
            have_bs = mb["rollout_logprob_mask"] * mask_bs
            diff_bs = (mb["rollout_logprobs"] - logp_bs).abs()
            # entropies on a 2^-24 grid sum exactly in float64 (integers < 2^53), so H does not
            # depend on how the step is split into micro-batches or DP ranks, to the bit
            ent_int_bs = torch.round(ent_bs.double() * ENTROPY_GRID)
            demo_bs = per_token(mb["is_demo"], mb["seq_ids"])
            out = {f"entropy/step_{w}": _masked_metric(
                ent_int_bs, entropy_token_mask(mask_bs, demo_bs, w).double())
                for w in ("rollout", "demo", "all")}
            out["mismatch/logprob_abs_diff"] = _masked_metric(diff_bs, have_bs)
            out["mismatch/logprob_abs_diff_max"] = _max_metric(diff_bs, have_bs)
            return logp_bs.sum() * 0.0, out

        def record_ref(mb, output):
            mb["ref_logprobs"] = output[0].float()
            return output[0].sum() * 0.0, {}

        dicts = []
        for model, record in ((self.model, record_old), (self.ref_model, record_ref)):
            if model is None:
                continue
            model.eval()

            def forward_step(it, m, record=record):
                mb = next(it)
                return self._policy_output(m, mb), partial(record, mb)

            for micro in minis:
                dicts += self._schedule(micro, forward_step, model, forward_only=True) or []
        self.model.train()
        metrics = self._from_last_stage(reduce_metrics(dicts, dp_group=self.layout.dp_group)
                                        if dicts else {})
        which = self.cfg.algorithm.entropy_tokens
        h = metrics[f"entropy/step_{which}"]
        h = h if not math.isnan(h) else metrics["entropy/step_all"]  # no such tokens
        metrics["entropy/step"] = h / ENTROPY_GRID
        for w in ("rollout", "demo", "all"):
            metrics.pop(f"entropy/step_{w}", None)
        if math.isnan(metrics.get("mismatch/logprob_abs_diff", math.nan)):
            metrics.pop("mismatch/logprob_abs_diff", None)  # no SGLang log-probs this step
            metrics.pop("mismatch/logprob_abs_diff_max", None)
        return metrics

    def train_batch(self, micro_batches, totals) -> dict:
        """One optimizer step on one mini-batch's micro-batches (Megatron schedule, fused
        SRFT loss, non-finite gradients skip the step; float16: loss-scale overflows too)."""
        from srft_mcore.algo.losses import make_loss_func, reduce_metrics

        cfg = self.cfg
        loss_func = make_loss_func(cfg.algorithm, totals, num_microbatches=len(micro_batches),
                                   dp_size=self.layout.dp)
        entropy_grad = bool(cfg.algorithm.entropy_coef)

        def forward_step(it, model):
            mb = next(it)
            return self._policy_output(model, mb, entropy_grad), partial(loss_func, mb)

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        # the schedule ends with finalize_model_grads: DP, tied-embedding and SP-norm grads
        outs = self._schedule(micro_batches, forward_step, self.model, forward_only=False)
        metrics = reduce_metrics(outs, dp_group=self.layout.dp_group) if outs else {}
        metrics = self._from_last_stage(metrics)

        fp16 = cfg.model.dtype == "float16"
        if not fp16 and not self._grads_finite():
            return self._skip(metrics, streak=True)
        if fp16:  # the scale this step's loss was multiplied by (its gradients hold it)
            scale = float(self.optimizer.get_loss_scale())
            metrics["optim/loss_scale"] = scale
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            # float16: Megatron found inf/NaN in the unscaled gradients, left the weights and
            # Adam state alone and halved the loss scale (from the optimizer.hysteresis-th
            # overflow on). An overflow is routine while the scale finds its level, so it
            # stops the run only at the smallest scale, where lowering it cannot help.
            self.overflow_steps += 1
            metrics["optim/overflow_steps"] = float(self.overflow_steps)
            return self._skip(metrics, streak=not fp16 or scale <= cfg.optimizer.min_loss_scale)
        self.skipped_in_a_row = 0
        # as Megatron-LM: only an applied update advances the LR schedule (warm-up and decay
        # count updates); the step counter, data and rollouts move on either way
        self.scheduler.step(increment=1)
        metrics.update({"train/skipped": 0.0, "optim/grad_norm": float(grad_norm or 0.0),
                        "optim/lr": self.optimizer.param_groups[0]["lr"]})
        if fp16:
            metrics["optim/overflow_steps"] = float(self.overflow_steps)
        return metrics

    def _skip(self, metrics: dict, streak: bool) -> dict:
        """A skipped optimizer step: counted in ``train/skipped``; ``streak`` steps in a row
        (non-finite gradients) stop the run after optimizer.max_consecutive_skips."""
        self.skipped_total += 1
        metrics["train/skipped"] = 1.0
        if not streak:
            return metrics
        self.skipped_in_a_row += 1
        limit = self.cfg.optimizer.max_consecutive_skips
        if self.skipped_in_a_row >= limit:
            raise TrainingStopped(
                f"step {self.step + 1}: {limit} optimizer steps in a row had non-finite "
                f"gradients (optimizer.max_consecutive_skips={limit}); stopped, the last "
                f"checkpoint is untouched. Fix: lower optimizer.lr, check the rewards and "
                f"data, or resume from the last checkpoint with --resume")
        return metrics

    def _grads_finite(self) -> bool:
        """One fused check of the whole fp32 gradient buffer, one all-reduce, one host copy."""
        buffers = self.model.buffers + self.model.expert_parallel_buffers
        bad = torch.zeros((), device=self.layout.device)
        for buf in buffers:
            bad = bad + (~torch.isfinite(buf.grad_data)).any().float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _from_last_stage(self, metrics: dict) -> dict:
        """Loss metrics exist on the last PP stage; give them to every rank."""
        if self.layout.pp == 1:
            return metrics
        return broadcast_object(metrics, self.layout.pp_group, group_src=self.layout.pp - 1)

    def save(self):
        state = {"rollout_calls": self.rollout_calls, "skipped_total": self.skipped_total,
                 "overflow_steps": self.overflow_steps,
                 "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "pending": pending_to_json(self.pending)}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model.module, self.optimizer,
                                    state, keep=self.cfg.checkpoint.keep)
        log0(f"saved checkpoint {path}")
        return path

    def export_hf(self) -> str:
        """Write the policy as a HF checkpoint (streamed tensor by tensor through rank 0)."""
        from srft_mcore.models.bridge import expected_hf_shapes, gather_hf_weights
        from tools.convert_ckpt.outdir import atomic_output_dir, copy_side_files
        from tools.convert_ckpt.safetensors_out import StreamingSafetensorsWriter

        out = os.path.join(self.run_dir, "hf_final")
        dtype = self.model.module.config.params_dtype
        stream = gather_hf_weights(self.model.module, self.hf, self.layout.tp_group,
                                   self.layout.pp_group, dtype=dtype)
        if self.layout.rank != 0:
            for _ in stream:  # take part in the gathers and sends
                pass
        else:
            with atomic_output_dir(out, overwrite=True) as tmp:
                plan = [(n, s, dtype) for n, s in expected_hf_shapes(self.hf).items()]
                writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes=5 * 2**30)
                try:
                    for name, tensor in stream:
                        writer.write(name, tensor)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                copy_side_files(self.model_dir, tmp)
                # with the overrides, and the dtype of the weights written (the training dtype)
                hf = {k: v for k, v in self.hf.items() if k != "torch_dtype"}
                hf["dtype"] = self.cfg.model.dtype
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(hf, f, indent=2)
        dist.barrier()
        log0(f"exported the policy as a HF checkpoint: {out}")
        return out

    # ------------------------------------------------------------------ the loop
    def train(self):
        from srft_mcore.training.metrics import MetricsLogger, ProgressBar, Timer

        cfg = self.cfg
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard,
                                wandb_project=cfg.logging.wandb_project,
                                resume_step=self.step + 1 if self.resumed else None,
                                enabled=self.layout.rank == 0, config=cfg.to_dict())
        bar = ProgressBar(cfg.train.steps, initial=self.step,
                          enabled=self.layout.rank == 0 and cfg.logging.progress_bar)
        timer = Timer()
        if self.eval_splits and self.step == 0:  # the start policy's held-out accuracy
            metrics.log(0, self.evaluate())
        overlap = cfg.rollout.overlap
        while self.step < cfg.train.steps:
            with timer("rollout"):
                if overlap and self.pending is not None:  # made while the last step trained
                    indices, groups, rewards = self.pending
                    self.pending = None
                else:
                    indices, groups, rewards = self._batch_now()
                if overlap and self.step + 1 < cfg.train.steps:
                    self._start_ahead()
            examples = self.dataset.batch(indices)
            seqs = build_sequences(examples, groups, rewards, cfg.algorithm)
            lag = policy_lag(groups, trained_from=self.step)
            with timer("train"):
                self.engine.before_train()  # colocated: SGLang frees its GPU memory
                record = self.train_step(seqs)
            self.step += 1
            if self.ahead is not None:
                with timer("rollout_wait"):  # the next batch, before the servers' weights change
                    self.pending = self._finish_ahead()
            with timer("sync"):  # failed for good: the step is logged, saved, then we stop
                sync_error = self.sync_or_error()
            record.update(lag)
            if sync_error is None and self.eval_splits and (self.step % cfg.eval.every == 0
                                                            or self.step == cfg.train.steps):
                with timer("eval"):
                    record.update(self.evaluate())
            record.update(rollout_metrics(groups, rewards, seqs))
            record.update(self.engine.metrics())
            times = timer.pop()
            record.update(times)
            record["perf/train_tokens_per_s"] = sum(len(s.tokens) for s in seqs) / max(
                times["time/train"], 1e-9)
            record["train/skipped_total"] = self.skipped_total
            record["perf/peak_mem_gb"] = peak_memory_gb(self.layout.cpu_group)
            metrics.log(self.step, record)
            bar.update(record)
            saved = None
            if (sync_error is not None or self.step % cfg.checkpoint.every == 0
                    or self.step == cfg.train.steps):
                saved = self.save()
            if sync_error is not None:
                raise self.sync_stopped(sync_error, saved)
        bar.close()
        metrics.close()
        return self.export_hf() if cfg.checkpoint.export_hf else None

    def close(self):
        if self.engine is not None:
            self.engine.shutdown()


def resume_command(run_dir: str) -> str:
    """The command that resumes this run: the run's own config.yaml (every override
    included) with --resume, under torchrun as this process was launched."""
    args = f"--config {os.path.join(run_dir, 'config.yaml')} --resume"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return f"srft-train {args}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // max(local, 1)
    launcher = (f"torchrun --standalone --nproc_per_node={local}" if nodes == 1 else
                f"torchrun --nnodes={nodes} --nproc_per_node={local} (with this run's "
                f"rendezvous options, on every node)")
    return f"{launcher} -m srft_mcore.training.trainer {args}"


def combine_updates(updates: list) -> dict:
    """The step's view of its mini-batch updates: means, maxima of ``*_max``, the skip count
    and the last learning rate, loss scale and overflow count."""
    out = {}
    for key in sorted({k for u in updates for k in u}):
        vals = [u[key] for u in updates if key in u and not math.isnan(u[key])]
        if key == "train/skipped":
            out[key] = float(sum(vals))
        elif key in ("optim/lr", "optim/loss_scale", "optim/overflow_steps"):
            out[key] = vals[-1] if vals else math.nan
        elif key.endswith("_max"):
            out[key] = max(vals, default=math.nan)
        else:
            out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


def peak_memory_gb(group=None) -> float:
    """The trainer's peak memory so far, the largest over the ranks of ``group``: CUDA's peak
    allocation on GPU; on CPU the process's peak resident set (Python and libraries
    included, so an upper bound of what the model needs)."""
    if torch.cuda.is_available():
        value = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux
    peak = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return float(peak.item())


def policy_lag(groups, trained_from: int) -> dict:
    """How many optimizer steps behind the trained weights (version ``trained_from``) the
    samples' policy is, from the weight version SGLang tagged each sample with."""
    lags = [trained_from - int(c.weight_version) for g in groups for c in g
            if c.weight_version is not None and str(c.weight_version).isdigit()]
    if not lags:
        return {}
    return {"rollout/policy_lag_mean": sum(lags) / len(lags),
            "rollout/policy_lag_max": float(max(lags)),
            "rollout/policy_lag_min": float(min(lags))}


def pending_to_json(pending):
    """The overlapped next batch as plain JSON (kept in the checkpoint for exact resume:
    it was generated by weights the checkpoint no longer holds)."""
    if pending is None:
        return None
    indices, groups, rewards = pending
    return {"indices": list(indices), "rewards": rewards,
            "groups": [[dataclasses.asdict(c) for c in g] for g in groups]}


def pending_from_json(data):
    from srft_mcore.rollout.client import Completion

    if not data:
        return None
    return (data["indices"], [[Completion(**c) for c in g] for g in data["groups"]],
            data["rewards"])


def rollout_metrics(groups, rewards, seqs) -> dict:
    """Reward, accuracy and length of the step's rollouts, and what was trained on."""
    flat_r = [r for rs in rewards for r in rs]
    lens = [len(c.token_ids) for g in groups for c in g]
    out = {"reward/mean": sum(flat_r) / max(len(flat_r), 1),
           "acc/mean": sum(r > 0 for r in flat_r) / max(len(flat_r), 1),
           "len/response_mean": sum(lens) / max(len(lens), 1),
           "len/response_max": max(lens, default=0),
           "len/clipped_frac": sum(c.finish_reason == "length" for g in groups for c in g)
           / max(len(lens), 1),
           "train/sequences": len(seqs),
           "train/demo_sequences": sum(s.is_demo for s in seqs)}
    solved = [any(r > 0 for r in rs) for rs in rewards]
    out["acc/any_of_n"] = sum(solved) / max(len(solved), 1)
    return out


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="srft-train", description="SRFT / SFT / GRPO / LUFFY "
                                "training on Megatron-Core with SGLang rollouts "
                                "(launch with torchrun --nproc_per_node=TP*PP*DP)")
    p.add_argument("--config", help="YAML config (see examples/configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    return p.parse_args(argv)


def _input_errors() -> tuple:
    """Exceptions that mean the user's input is wrong: reported in one paragraph, exit 2."""
    from srft_mcore.models.bridge import BridgeError
    from srft_mcore.training.checkpoint import CheckpointError
    from srft_mcore.data import DataError, TemplateError
    from srft_mcore.models import UnsupportedArchitecture
    from srft_mcore.reward import RewardError
    from srft_mcore.rollout.server import ServerStartError
    from srft_mcore.rollout.weight_sync import UnsupportedServer

    return (ConfigError, FileNotFoundError, DataError, TemplateError, RewardError, BridgeError,
            CheckpointError, UnsupportedArchitecture, ServerStartError, TrainingStopped,
            UnsupportedServer)


def main(argv=None) -> int:
    from srft_mcore.training.lifecycle import watch_launcher

    watch_launcher()  # under torchrun: this rank and its SGLang servers end with the launcher
    args = parse_args(argv)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides + (["checkpoint.resume=true"]
                                                         if args.resume else []))
        hf = None
        if cfg.model.hf_path:
            from srft_mcore.models import get_architecture, load_hf_config

            from srft_mcore.models.tiny import check_tokenizer_files

            hf = load_hf_config(cfg.model.hf_path)
            get_architecture(hf)
            check_tokenizer_files(cfg.model.hf_path)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), hf_config=hf)
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.train()
    except _input_errors() as e:
        from srft_mcore.training.checkpoint import CheckpointError

        rank = os.environ.get("RANK", "0")
        # every rank meets a config error alike; a damaged file or a stop may hit one rank
        # first, and torchrun ends the others before they print
        if rank == "0":
            print(f"srft-train: {e}", file=sys.stderr, flush=True)
        elif isinstance(e, (CheckpointError, TrainingStopped)):
            print(f"srft-train (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
            if getattr(trainer, "run_lock", None) is not None:
                trainer.run_lock.release()
    log0(f"run directory: {trainer.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
