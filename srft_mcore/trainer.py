"""The single-stage SRFT trainer: one step = rollout -> reward -> advantages -> train -> sync.

Launched with torchrun (``srft-train --config FILE [a.b=c ...]``); every rank runs this
loop. Rank 0 owns the SGLang servers and the reward; the step's prompts, rollouts and
rewards are broadcast so all ranks build the same sequences, and each DP rank trains on
its share through Megatron's forward-backward schedule with the fused SRFT loss.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from srft_mcore import checkpoint as ckpt
from srft_mcore.batching import build_sequences, make_micro_batches
from srft_mcore.config import Config, ConfigError, load_config, save_config, validate
from srft_mcore.distributed import broadcast_object


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
        self.engine = None

    # ------------------------------------------------------------------ building
    def setup(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from srft_mcore.bridge import load_hf_into_model
        from srft_mcore.data import (EMBEDDED_TASK, PromptSampler, build_dataset,
                                     write_embedded_dataset)
        from srft_mcore.distributed import init_distributed
        from srft_mcore.models import build_model, load_hf_config
        from srft_mcore.models.tiny import load_tokenizer
        from srft_mcore.reward import get_reward_fn

        cfg = self.cfg
        # everything that can be wrong with the input is checked before heavy work
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and world > 1 and "RANK" not in os.environ:
            raise ConfigError("WORLD_SIZE is set without RANK: launch with torchrun")
        self._refuse_to_overwrite()
        os.makedirs(self.run_dir, exist_ok=True)
        self.layout = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp,
                                       backend=cfg.parallel.backend, seed=cfg.train.seed)
        self.model_dir = resolve_model_dir(cfg)
        self.hf = load_hf_config(self.model_dir)
        validate(cfg, world_size=self.layout.world_size, hf_config=self.hf)
        self.tokenizer = load_tokenizer(self.model_dir)
        data_cfg = cfg.data
        if data_cfg.path is None:  # the embedded task, written once by rank 0
            data_cfg = dataclasses.replace(data_cfg, path=os.path.join(self.run_dir,
                                                                       "embedded_task.jsonl"))
            if self.layout.rank == 0 and not os.path.isfile(data_cfg.path):
                write_embedded_dataset(data_cfg.path, n=2000, seed=cfg.train.seed,
                                       **EMBEDDED_TASK)
            dist.barrier()
        self.dataset = build_dataset(data_cfg, self.tokenizer, run_dir=self.run_dir,
                                     require_demo=cfg.algorithm.name != "grpo", report=log0)
        self.sampler = PromptSampler(len(self.dataset), cfg.train.prompts_per_step,
                                     seed=cfg.data.shuffle_seed)
        self.reward_fn = get_reward_fn(cfg.reward.fn)
        if self.layout.rank == 0:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        model = build_model(self.hf, cfg.model, cfg.parallel)
        if cfg.model.load_hf_weights and not cfg.model.load_mcore:
            load_hf_into_model(model, self.model_dir, self.hf, tp_group=self.layout.tp_group)
        use_distopt = cfg.parallel.use_distributed_optimizer and self.layout.dp > 1
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
                            params_dtype=model.config.params_dtype), [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(cfg.train.steps, 1),
            lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(cfg.train.steps, 1), wd_incr_style="constant")
        if cfg.model.load_mcore:  # e.g. the RL stage of SFT->RL starts from the SFT run
            kind = ckpt.load_model_weights(cfg.model.load_mcore, self.model.module)
            log0(f"loaded model weights from the {kind} {cfg.model.load_mcore}")

        ckpt.clean_stale(self.ckpt_dir)
        self.resumed = False
        if cfg.checkpoint.resume:
            self.resume()
        self.start_rollout()
        return self

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
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        log0(f"resumed from {path} at step {self.step}")
        self.resumed = True

    def start_rollout(self):
        from srft_mcore.rollout.engine import RolloutEngine

        self.engine = RolloutEngine.launch(self.cfg.rollout, model_path=self.model_dir,
                                           layout=self.layout, hf_config=self.hf,
                                           work_dir=os.path.join(self.run_dir, "rollout"))
        if self.step > 0 or self.cfg.model.load_mcore:
            # the servers start from the HF weights on disk: give them the policy's
            self.engine.sync_weights(self.model.module, version=str(self.step))

    # ------------------------------------------------------------------ one step
    def rollout(self, examples):
        """Rank 0 samples n continuations per prompt; everyone receives them."""
        from srft_mcore.rollout.client import SamplingParams
        from srft_mcore.rollout.seeded import mix_seed

        cfg = self.cfg
        seed = mix_seed(cfg.train.seed, self.rollout_calls) if cfg.rollout.seeded else None
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.data.max_response_len,
                                  stop_token_ids=[self.tokenizer.eos_token_id], seed=seed)
        groups = self.engine.generate([ex.prompt_ids for ex in examples],
                                      n=cfg.rollout.n_samples, sampling=sampling)
        self.rollout_calls += 1
        return groups

    def score(self, examples, groups):
        rewards = None
        if self.layout.rank == 0:
            from srft_mcore.reward import score_batch

            rewards = [score_batch(self.reward_fn, [c.text for c in comps],
                                   [ex.answer] * len(comps), [ex.prompt] * len(comps))
                       for ex, comps in zip(examples, groups)]
        return rewards

    def train_batch(self, micro_batches, totals):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from srft_mcore.algo.losses import make_loss_func, reduce_metrics
        from srft_mcore.models.policy import policy_forward

        cfg = self.cfg
        n_micro = len(micro_batches)
        loss_func = make_loss_func(cfg.algorithm, totals, num_microbatches=n_micro,
                                   dp_size=self.layout.dp,
                                   onpolicy_form=cfg.algorithm.onpolicy_form)
        vocab = self.hf["vocab_size"]

        def forward_step(it, model):
            mb = next(it)
            out = policy_forward(model, mb["tokens"], mb["position_ids"], mb["targets"],
                                 vocab_size=vocab, tp_group=self.layout.tp_group,
                                 temperature=cfg.rollout.temperature,
                                 entropy_grad=cfg.algorithm.entropy_coef > 0)
            return out, partial(loss_func, mb)

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        seq_len = micro_batches[0]["tokens"].shape[1]
        outs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches),
            model=[self.model], num_microbatches=n_micro, seq_length=seq_len,
            micro_batch_size=micro_batches[0]["tokens"].shape[0], decoder_seq_length=seq_len,
            forward_only=False)
        self.model.finish_grad_sync()
        metrics = reduce_metrics(outs, dp_group=self.layout.dp_group) if outs else {}
        metrics = self._from_last_stage(metrics)

        if not self._grads_finite():
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            metrics["train/skipped"] = 1.0
            limit = cfg.optimizer.max_consecutive_skips
            if self.skipped_in_a_row >= limit:
                raise RuntimeError(f"{limit} steps in a row had non-finite gradients; stopping. "
                                   f"Lower optimizer.lr or check the data (last step {self.step})")
            return metrics
        self.skipped_in_a_row = 0
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics.update({"train/skipped": 0.0, "optim/grad_norm": float(grad_norm or 0.0),
                        "optim/lr": self.optimizer.param_groups[0]["lr"]})
        return metrics

    def _grads_finite(self) -> bool:
        bad = torch.zeros(1)
        for p in self.model.module.parameters():
            g = getattr(p, "main_grad", None)
            if g is not None and not torch.isfinite(g).all():
                bad[0] = 1.0
                break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _from_last_stage(self, metrics: dict) -> dict:
        """Loss metrics exist on the last PP stage; give them to every rank."""
        if self.layout.pp == 1:
            return metrics
        return broadcast_object(metrics, self.layout.pp_group, group_src=self.layout.pp - 1)

    def save(self):
        state = {"rollout_calls": self.rollout_calls, "skipped_total": self.skipped_total,
                 "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict()}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model.module, self.optimizer,
                                    state, keep=self.cfg.checkpoint.keep)
        log0(f"saved checkpoint {path}")

    def export_hf(self) -> str:
        """Write the policy as a HF checkpoint (streamed tensor by tensor through rank 0)."""
        from srft_mcore.bridge import expected_hf_shapes, gather_hf_weights
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
        dist.barrier()
        log0(f"exported the policy as a HF checkpoint: {out}")
        return out

    # ------------------------------------------------------------------ the loop
    def train(self):
        from srft_mcore.algo.losses import batch_totals
        from srft_mcore.metrics import MetricsLogger, ProgressBar, Timer

        cfg = self.cfg
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard,
                                wandb_project=cfg.logging.wandb_project,
                                resume_step=self.step + 1 if self.resumed else None,
                                enabled=self.layout.rank == 0, config=cfg.to_dict())
        bar = ProgressBar(cfg.train.steps, initial=self.step,
                          enabled=self.layout.rank == 0 and cfg.logging.progress_bar)
        timer = Timer()
        while self.step < cfg.train.steps:
            examples = self.dataset.batch(self.sampler.next_batch())
            with timer("rollout"):
                groups = self.rollout(examples)
            with timer("reward"):
                rewards = self.score(examples, groups)
                groups, rewards = broadcast_object((groups, rewards))
            seqs = build_sequences(examples, groups, rewards, cfg.algorithm)
            micro = make_micro_batches(seqs, cfg.train.micro_batch_size, self.layout.dp_rank,
                                       self.layout.dp, self.tokenizer.pad_token_id)
            totals = batch_totals(torch.cat([m["loss_mask"] for m in micro]),
                                  torch.cat([m["is_demo"] for m in micro]),
                                  max_len=cfg.data.max_response_len, dp_group=self.layout.dp_group)
            with timer("train"):
                record = self.train_batch(micro, totals)
            self.step += 1
            with timer("sync"):
                self.engine.sync_weights(self.model.module, version=str(self.step))
            record.update(rollout_metrics(groups, rewards, seqs))
            record.update(self.engine.metrics())
            times = timer.pop()
            record.update(times)
            record["perf/train_tokens_per_s"] = sum(len(s.tokens) for s in seqs) / max(
                times["time/train"], 1e-9)
            record["train/skipped_total"] = self.skipped_total
            metrics.log(self.step, record)
            bar.update(record)
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                self.save()
        bar.close()
        metrics.close()
        return self.export_hf() if cfg.checkpoint.export_hf else None

    def close(self):
        if self.engine is not None:
            self.engine.shutdown()


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
    from srft_mcore.bridge import BridgeError
    from srft_mcore.checkpoint import CheckpointError
    from srft_mcore.data import DataError, TemplateError
    from srft_mcore.models import UnsupportedArchitecture
    from srft_mcore.reward import RewardError
    from srft_mcore.rollout.server import ServerStartError

    return (ConfigError, FileNotFoundError, DataError, TemplateError, RewardError, BridgeError,
            CheckpointError, UnsupportedArchitecture, ServerStartError)


def main(argv=None) -> int:
    args = parse_args(argv)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides + (["checkpoint.resume=true"]
                                                         if args.resume else []))
        hf = None
        if cfg.model.hf_path:
            from srft_mcore.models import get_architecture, load_hf_config

            hf = load_hf_config(cfg.model.hf_path)
            get_architecture(hf)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), hf_config=hf)
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.train()
    except _input_errors() as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"srft-train: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    log0(f"run directory: {trainer.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
