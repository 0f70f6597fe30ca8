"""The trained policy and what updates it: the model (Megatron DDP), its optimizer and LR
schedule, the frozen reference for a KL penalty, and one training step on a rollout batch.

A step (:meth:`Policy.train_on`, arXiv 2506.19767 section 4) is one no-grad pass of the
policy that generated the batch (old log-probs and the step's entropy H), then one optimizer
step per mini-batch through Megatron's forward-backward schedule with the fused SRFT loss.
Non-finite gradients skip an optimizer step; K such steps in a row stop the run.
"""
from __future__ import annotations

import json
import math
import os
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from srft_mcore.config import Config
from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.training import checkpoint as ckpt
from srft_mcore.training.messages import TrainingStopped, log0

ENTROPY_GRID = 2.0 ** 24
"""Entropies are summed on this grid (see :func:`record_old_policy`)."""


# --------------------------------------------------------------------------- building
def build_optimizer(cfg: Config, model, use_distopt: bool):
    """Megatron's Adam over ``model`` (DDP-wrapped), with mixed precision from model.dtype."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    return get_megatron_optimizer(
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
                        params_dtype=model.config.params_dtype), [model])


def build_scheduler(cfg: Config, optimizer):
    """The LR schedule; it counts optimizer steps, train.mini_batches per training step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, k = cfg.optimizer, cfg.train.mini_batches
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps * k, lr_decay_steps=max(cfg.train.steps * k, 1),
        lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train.steps * k, 1), wd_incr_style="constant")


# --------------------------------------------------------------------------- the policy
class Policy:
    """The policy model being trained, on this rank's share of the layout.

    The start weights (HF or ``model.load_mcore``) are loaded before the optimizer is
    built: a mixed-precision optimizer clones fp32 master weights at construction, and a
    later load would be undone by its first step.
    """

    def __init__(self, cfg: Config, layout, hf: dict, model_dir: str, pad_token_id: int):
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig,
                                               finalize_model_grads)

        self.cfg, self.layout, self.hf, self.model_dir = cfg, layout, hf, model_dir
        self.pad_token_id = pad_token_id
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.overflow_steps = 0  # float16: optimizer steps the loss-scale overflow skipped
        self.weight_state = {}  # algorithm.weight_schedule's state (saved in checkpoints)
        p = cfg.parallel
        model = self._build_start_model(ddp=True)
        use_distopt = p.use_distributed_optimizer and layout.dp > 1
        # the schedule then all-reduces DP grads, tied embedding grads across PP stages and
        # sequence-parallel norm grads after the last micro-batch (Megatron-LM training.py)
        model.config.finalize_model_grads_func = finalize_model_grads
        self.model = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=use_distopt), module=model)
        self.optimizer = build_optimizer(cfg, self.model, use_distopt)
        if cfg.model.load_mcore and cfg.model.load_optimizer:  # before the schedule sets lr
            ckpt.load_optimizer_state(cfg.model.load_mcore, model, self.optimizer)
            log0(f"loaded the optimizer state of {cfg.model.load_mcore}")
        if cfg.model.dtype == "float16":  # the schedule's backward starts from the scaled loss
            model.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.ref_model = None
        if cfg.algorithm.kl_coef > 0:  # frozen start policy, same sharding, no optimizer
            self.ref_model = self._build_start_model(quiet=True)
            self.ref_model.eval()
            for param in self.ref_model.parameters():
                param.requires_grad_(False)

    def _build_start_model(self, quiet: bool = False, ddp: bool = False):
        """A GPTModel stage holding the start weights: model.load_mcore, else HF. ddp: the
        trained policy (wrapped in Megatron's DDP), not the frozen reference."""
        from srft_mcore.models import build_model
        from srft_mcore.models.bridge import load_hf_into_model

        cfg = self.cfg
        model = build_model(self.hf, cfg.model, cfg.parallel, ddp=ddp)
        if cfg.model.load_mcore:  # e.g. the RL stage of SFT->RL starts from the SFT run
            kind = ckpt.load_model_weights(cfg.model.load_mcore, model, self.hf)
            if not quiet:
                log0(f"loaded model weights from the {kind} {cfg.model.load_mcore}")
        elif cfg.model.load_hf_weights:
            load_hf_into_model(model, self.model_dir, self.hf, tp_group=self.layout.tp_group)
        return model

    # ------------------------------------------------------------------ one training step
    def train_on(self, seqs, step: int = 1) -> dict:
        """Train on one rollout batch (a list of :class:`TrainSequence`), as the paper does.

        1. Split it into ``train.mini_batches`` optimizer mini-batches of whole prompt groups
           (:meth:`mini_batches`).
        2. One no-grad pass of the policy that generated it (:meth:`old_policy_pass`): old
           log-probs, the step's entropy H (one scalar for every micro-batch and rank) and
           the training-inference mismatch against SGLang's log-probs.
        3. One optimizer step per mini-batch (:meth:`update`).
        ``step`` (the run's step, from 1) is what a stop message names. Returns the step's
        metrics on every rank.
        """
        parts, minis = self.mini_batches(seqs)
        record = self.old_policy_pass(minis)
        record.update(self.update(parts, minis, record["entropy/step"], step))
        return record

    def mini_batches(self, seqs) -> tuple:
        """``seqs`` in ``train.mini_batches`` optimizer mini-batches of whole prompt groups:
        the sequences of each, and this DP rank's micro-batches of each."""
        from srft_mcore.training.batching import split_mini_batches

        k = self.cfg.train.mini_batches
        n_groups = max((s.group for s in seqs), default=-1) + 1
        parts = [p for p in split_mini_batches(seqs, k, -(-n_groups // k) * k) if p]
        return parts, [self._micro_batches(part) for part in parts]

    def update(self, parts, minis, entropy: float, step: int = 1) -> dict:
        """One optimizer step per mini-batch (:meth:`train_batch`), their metrics combined.
        From the second on the policy has moved, so the ratio to the old log-probs is no
        longer 1 and clips. ``entropy``: the step's H, the weights' with
        ``algorithm.entropy_weighting=batch``; it first advances
        ``algorithm.weight_schedule`` (once per step, so the step's own H enters its
        weights, as in batch mode), whose scalars then weight every mini-batch."""
        from srft_mcore.algo.weight_schedule import schedule_metrics, schedule_step
        from srft_mcore.training.batching import sequence_totals

        cfg = self.cfg
        weights, self.weight_state = schedule_step(self.weight_state, entropy, cfg.algorithm)
        pair = None if weights is None else (weights.w_sft, weights.w_rl)
        entropy = entropy if cfg.algorithm.entropy_weighting == "batch" else None
        updates = []
        for part, micro in zip(parts, minis):
            totals = sequence_totals(part, max_len=cfg.data.max_response_len,
                                     batch_entropy=entropy)
            totals.weights = pair
            updates.append(self.train_batch(micro, totals, step))
        out = combine_updates(updates)
        out.update(schedule_metrics(weights, self.weight_state))
        return out

    def _micro_batches(self, seqs) -> list:
        """This DP rank's micro-batches of ``seqs``, on the layout's device."""
        from srft_mcore.training.batching import make_micro_batches

        p, t = self.cfg.parallel, self.cfg.train
        micro = make_micro_batches(seqs, t.micro_batch_size, self.layout.dp_rank,
                                   self.layout.dp, self.pad_token_id,
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

    def _policy_output(self, model, mb, entropy_grad: bool = False, token_loss=None,
                       misses=None):
        from srft_mcore.models.policy import policy_forward

        packed = mb if self.cfg.train.max_tokens_per_micro_batch else None
        return policy_forward(model, mb["tokens"], mb["position_ids"], mb["targets"],
                              vocab_size=self.hf["vocab_size"], tp_group=self.layout.tp_group,
                              temperature=self.cfg.rollout.temperature,
                              entropy_grad=entropy_grad, packed=packed, token_loss=token_loss,
                              token_loss_misses=misses)

    @torch.no_grad()
    def old_policy_pass(self, minis: list) -> dict:
        """Forward the whole step batch once with the weights that generated it.

        Stores ``old_logprobs`` (and ``ref_logprobs`` with a KL penalty) on each micro-batch
        of the last pipeline stage, the same fused kernel as training so the first
        mini-batch's ratio is exactly 1. Returns ``entropy/step`` (mean entropy over
        ``algorithm.entropy_tokens``; all trained tokens when there are none) and the
        mismatch |log p_sglang - log p_megatron| over rollout tokens, on every rank.
        """
        from srft_mcore.algo.losses import reduce_metrics

        dicts = []
        for model, record in ((self.model, record_old_policy), (self.ref_model, record_ref)):
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
        return step_entropy(metrics, self.cfg.algorithm.entropy_tokens)

    def train_batch(self, micro_batches, totals, step: int = 1) -> dict:
        """One optimizer step on one mini-batch's micro-batches (Megatron schedule, fused
        SRFT loss, non-finite gradients skip the step; float16: loss-scale overflows too)."""
        from srft_mcore.algo.losses import make_loss_func, reduce_metrics

        cfg = self.cfg
        loss_func = make_loss_func(cfg.algorithm, totals, num_microbatches=len(micro_batches),
                                   dp_size=self.layout.dp)
        entropy_grad = bool(cfg.algorithm.entropy_coef)
        in_kernel = cfg.model.loss_in_kernel
        # the kernel's count of tokens whose in-kernel gradient was wrong, read with the
        # step's gradient check (no host sync per micro-batch)
        misses = torch.zeros((), device=self.layout.device) if in_kernel else None

        def forward_step(it, model):
            mb = next(it)
            token_loss = loss_func.token_loss(mb) if in_kernel else None
            return (self._policy_output(model, mb, entropy_grad, token_loss, misses),
                    partial(loss_func, mb))

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        # the schedule ends with finalize_model_grads: DP, tied-embedding and SP-norm grads
        outs = self._schedule(micro_batches, forward_step, self.model, forward_only=False)
        metrics = reduce_metrics(outs, dp_group=self.layout.dp_group) if outs else {}
        metrics = self._from_last_stage(metrics)

        fp16 = cfg.model.dtype == "float16"
        finite = True
        if not fp16 or misses is not None:
            finite, exact = self._grads_finite(grads=not fp16, misses=misses)
            if not exact:
                raise RuntimeError(
                    f"step {step}: the loss formed inside the fused kernel is not a sum of "
                    f"per-token terms (some token's gradient depends on other tokens), so "
                    f"this step's gradients are wrong; nothing was applied. Fix: set "
                    f"model.loss_in_kernel=false (autograd through the kernel's log-probs "
                    f"and entropies), or make the new loss term per-token")
        if not finite:
            return self._skip(metrics, streak=True, step=step)
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
            return self._skip(metrics, streak=not fp16 or scale <= cfg.optimizer.min_loss_scale,
                              step=step)
        self.skipped_in_a_row = 0
        # as Megatron-LM: only an applied update advances the LR schedule (warm-up and decay
        # count updates); the step counter, data and rollouts move on either way
        self.scheduler.step(increment=1)
        metrics.update({"train/skipped": 0.0, "optim/grad_norm": float(grad_norm or 0.0),
                        "optim/lr": self.optimizer.param_groups[0]["lr"]})
        if fp16:
            metrics["optim/overflow_steps"] = float(self.overflow_steps)
        return metrics

    # ------------------------------------------------------------------ gradient checks
    def _skip(self, metrics: dict, streak: bool, step: int) -> dict:
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
                f"step {step}: {limit} optimizer steps in a row had non-finite "
                f"gradients (optimizer.max_consecutive_skips={limit}); stopped, the last "
                f"checkpoint is untouched. Fix: lower optimizer.lr, check the rewards and "
                f"data, or resume from the last checkpoint with --resume")
        return metrics

    def _grads_finite(self, grads: bool = True, misses=None) -> tuple:
        """(gradients finite, loss-in-kernel exact): one fused check of the whole fp32
        gradient buffer (``grads``) and of the kernel's ``misses`` count, one all-reduce, one
        host copy."""
        buffers = self.model.buffers + self.model.expert_parallel_buffers if grads else []
        bad = torch.zeros(2, device=self.layout.device)
        for buf in buffers:
            bad[0] += (~torch.isfinite(buf.grad_data)).any().float()
        if misses is not None:
            bad[1] += misses
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        nonfinite, missed = bad.tolist()
        return nonfinite == 0.0, missed == 0.0

    def _from_last_stage(self, metrics: dict) -> dict:
        """Loss metrics exist on the last PP stage; give them to every rank."""
        if self.layout.pp == 1:
            return metrics
        return broadcast_object(metrics, self.layout.pp_group, group_src=self.layout.pp - 1)

    # ------------------------------------------------------------------ export
    def export_hf(self, out: Optional[str] = None) -> str:
        """Write the policy as a HF checkpoint (streamed tensor by tensor through rank 0)
        into ``out`` (default: ``<logging.run_dir>/hf_final``)."""
        from srft_mcore.models.bridge import gather_hf_weights
        from srft_mcore.models.name_map import expected_hf_shapes
        from tools.convert_ckpt.outdir import atomic_output_dir, copy_side_files
        from tools.convert_ckpt.safetensors_out import StreamingSafetensorsWriter

        out = out or os.path.join(os.path.abspath(self.cfg.logging.run_dir), "hf_final")
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


# --------------------------------------------------------------------------- the old-policy pass
def record_old_policy(mb, output):
    """The old-policy pass's loss function for one micro-batch: keeps the old log-probs on
    ``mb`` and returns the entropy sums and the SGLang mismatch (no loss)."""
    from srft_mcore.algo.losses import _masked_metric, _max_metric, entropy_token_mask, \
        per_token

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
    """The reference pass's: keeps the frozen start policy's log-probs on ``mb``."""
    mb["ref_logprobs"] = output[0].float()
    return output[0].sum() * 0.0, {}


def step_entropy(metrics: dict, which: str) -> dict:
    """The old-policy pass's metrics with ``entropy/step``: the mean entropy over the
    ``which`` tokens (all trained tokens when the step has none); SGLang's mismatch only
    when the step had its log-probs."""
    h = metrics[f"entropy/step_{which}"]
    h = h if not math.isnan(h) else metrics["entropy/step_all"]  # no such tokens
    metrics["entropy/step"] = h / ENTROPY_GRID
    for w in ("rollout", "demo", "all"):
        metrics.pop(f"entropy/step_{w}", None)
    if math.isnan(metrics.get("mismatch/logprob_abs_diff", math.nan)):
        metrics.pop("mismatch/logprob_abs_diff", None)  # no SGLang log-probs this step
        metrics.pop("mismatch/logprob_abs_diff_max", None)
    return metrics


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
