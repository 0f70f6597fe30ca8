"""The single-stage SRFT trainer: one step = rollout -> reward -> advantages -> train -> sync.

Every rank runs this loop (``srft-train --nproc-per-node N --config FILE [a.b=c ...]``
launches them under torchrun; ``python -m srft_mcore.training`` is one rank). Rank 0 owns the
SGLang servers and the reward (:mod:`.rollout_side`); the step's prompts, rollouts and
rewards are broadcast so all ranks build the same sequences, and each DP rank trains on its
share through Megatron's forward-backward schedule with the fused SRFT loss (:mod:`.policy`).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from srft_mcore.config import Config, ConfigError, save_config, validate
from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.models.tiny import resolve_model_dir
from srft_mcore.training import checkpoint as ckpt
from srft_mcore.training.batching import build_sequences
from srft_mcore.training.messages import TrainingStopped, log0
from srft_mcore.training.policy import Policy
from srft_mcore.training.rollout_side import RolloutSide, policy_lag, rollout_metrics
from srft_mcore.training.run_inputs import (add_run_arguments, load_checked_config,
                                            refuse_to_overwrite, run_dirs)


class Trainer:
    """One SRFT run on this rank: :meth:`setup`, then :meth:`train` (:meth:`train_step` per
    step), then :meth:`close`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir, self.ckpt_dir = run_dirs(cfg)
        self.step = 0
        self.resumed = False
        self.policy = None  # the model, optimizer and schedule (policy.py)
        self.rollouts = None  # prompts -> completions -> rewards (rollout_side.py)
        self.engine = None  # the SGLang servers
        self.offloader = None  # colocated: the training state's trips to host memory
        self.eval_splits = {}
        self.metrics = self.bar = self.timer = None  # the run's logging, made by train()

    # ------------------------------------------------------------------ building
    def init_policy(self) -> Policy:
        """Process groups and the :class:`Policy` (model, DDP, optimizer, scheduler), no data
        or SGLang; returns the policy (tests and benchmarks train it on made-up batches)."""
        self._init_groups()
        return self._init_policy()

    def _init_groups(self):
        """Process groups, the model's HF config and tokenizer, the checked config."""
        from srft_mcore.config.hf_config import with_overrides
        from srft_mcore.launching.distributed import init_distributed
        from srft_mcore.config import load_hf_config
        from srft_mcore.models.tiny import load_tokenizer

        cfg = self.cfg
        p = cfg.parallel
        self.layout = init_distributed(tp=p.tp, pp=p.pp, cp=p.cp, backend=p.backend,
                                       seed=cfg.train.seed, timeout_s=p.timeout_s,
                                       wait_timeout_s=p.wait_timeout_s)
        self.model_dir = resolve_model_dir(cfg)
        # model.rope_theta / max_position_embeddings: one config for the model, SGLang, export
        self.hf = with_overrides(load_hf_config(self.model_dir), cfg.model)
        validate(cfg, world_size=self.layout.world_size, hf_config=self.hf)
        self.tokenizer = load_tokenizer(self.model_dir)

    def _init_policy(self) -> Policy:
        from srft_mcore.training.offload import StateOffloader, resolve_offload

        self.policy = Policy(self.cfg, self.layout, self.hf, self.model_dir,
                             pad_token_id=self.tokenizer.pad_token_id)
        self.offloader = StateOffloader([self.policy.model, self.policy.ref_model],
                                        self.policy.optimizer, resolve_offload(self.cfg.rollout))
        return self.policy

    def setup(self):
        from srft_mcore.data import (EMBEDDED_TASK, PromptSampler, build_dataset,
                                     held_out_prompts, write_embedded_dataset)
        from srft_mcore.reward import get_reward_fn
        from srft_mcore.rollout.server_routes import check_attached_servers
        from srft_mcore.training.lifecycle import lock_run_dir

        cfg = self.cfg
        # everything that can be wrong with the input is checked before heavy work
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and world > 1 and "RANK" not in os.environ:
            raise ConfigError("WORLD_SIZE is set without RANK: launch with torchrun")
        # one trainer per run directory, checked first: rank 0 holds the lock until it exits
        # (if it is refused, torchrun stops the other ranks, still waiting at the rendezvous)
        self.run_lock = lock_run_dir(self.run_dir) if os.environ.get("RANK", "0") == "0" else None
        refuse_to_overwrite(cfg)
        os.makedirs(self.run_dir, exist_ok=True)
        self._init_groups()
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
        sampler = PromptSampler(len(self.dataset), cfg.train.prompts_per_step,
                                seed=cfg.data.shuffle_seed)
        self.rollouts = RolloutSide(cfg, self.layout, self.tokenizer, self.dataset, sampler,
                                    get_reward_fn(cfg.reward.fn))
        self._demo_quality()
        self.eval_splits = self._load_eval_splits()
        self._init_policy()

        ckpt.clean_stale(self.ckpt_dir)
        if cfg.checkpoint.resume:
            self.resume()
        if self.layout.rank == 0:  # after a resume has read its checkpoint: a failed one
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))  # changes nothing
        more = self.step < cfg.train.steps
        if more:  # colocated: launched servers size their KV cache from the memory left free
            self.offloader.offload(weights=False)
        self.start_rollout()
        if more:  # rollout.offload=all: the weights too, now that the servers have them
            self.offloader.offload()
        self.offloader.mark("rollout")
        return self

    def _demo_quality(self):
        """data.verify_demos: rank 0 scores every demonstration once (in the reward workers)
        and every rank takes the scores as the demonstrations' rewards; rank 0 records this
        and data.demo_quality's corruption in <run_dir>/demo_quality.json."""
        from srft_mcore.data.demo_quality import (score_demonstrations, set_demo_rewards,
                                                  verification_summary, write_record)

        ds, verified = self.dataset, None
        if ds.demo_quality is not None:  # every rank corrupted alike (swap checks use math-verify)
            digest = broadcast_object(ds.demo_quality.digest, self.layout.cpu_group)
            if digest != ds.demo_quality.digest:
                raise RuntimeError(f"data.demo_quality: rank {self.layout.rank}'s corrupted "
                                   f"demonstrations differ from rank 0's (a math-verify timeout "
                                   f"in a swap check?). Fix: rerun; if it persists, use "
                                   f"data.demo_quality.wrong_kind=slip or another seed")
        if self.cfg.data.verify_demos and ds.examples[0].demo_ids is not None:
            scored = (score_demonstrations(ds.examples, self.rollouts.reward_fn,
                                           self.rollouts.reward_pool)
                      if self.layout.rank == 0 else None)
            scores, timeouts = broadcast_object(scored, self.layout.cpu_group)
            verified = set_demo_rewards(ds.examples, scores)
            log0(verification_summary(verified, timeouts))
        if self.layout.rank == 0:
            write_record(os.path.join(self.run_dir, "demo_quality.json"), ds.demo_quality,
                         verified)

    def _load_eval_splits(self) -> dict:
        """The held-out splits of ``eval``, checked now (bad files fail before training).
        The embedded task ships three (``val``, for choosing settings, and ``id``: two-step
        problems its training data never contains; ``ood``: four-step chains), see
        :mod:`srft_mcore.data.embedded`."""
        from srft_mcore.data import embedded_eval_splits, embedded_validation_split
        from srft_mcore.evaluation.records import load_eval_set

        ev = self.cfg.eval
        if not ev.every:
            return {}
        # no eval.splits: the embedded task's validation and held-out splits (validate()
        # requires eval.splits for user data)
        splits = dict(ev.splits or {}) or {**embedded_validation_split(),
                                           **embedded_eval_splits()}
        return {name: load_eval_set(path, name=name, limit=ev.limit)
                for name, path in splits.items()}

    def start_rollout(self):
        from srft_mcore.rollout.engine import RolloutEngine
        from srft_mcore.rollout.server import context_server_args

        self.engine = RolloutEngine.launch(self.cfg.rollout, model_path=self.model_dir,
                                           server_args=[*context_server_args(self.cfg, self.hf),
                                                        "--dtype", self.cfg.model.dtype],
                                           layout=self.layout, hf_config=self.hf,
                                           work_dir=os.path.join(self.run_dir, "rollout"),
                                           group=self.layout.cpu_group)
        self.rollouts.engine = self.engine
        if (self.step > 0 or self.cfg.model.load_mcore or self.cfg.rollout.overlap
                or self.cfg.rollout.urls):
            # launched servers start from the HF weights on disk: give them the policy's
            # (and, overlapped, a version tag from the first sample on, for the lag metric);
            # a resumed run does so before its first rollout. Servers attached by URL hold
            # whatever they were last given (another run's policy): always synced first
            error = self.sync_or_error()
            if error is not None:
                raise self.sync_stopped(error)

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Train from the current step to train.steps; the exported HF policy's directory
        when checkpoint.export_hf."""
        from srft_mcore.training.metrics import MetricsLogger, ProgressBar, Timer

        cfg = self.cfg
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project,
                                     resume_step=self.step + 1 if self.resumed else None,
                                     enabled=self.layout.rank == 0, config=cfg.to_dict())
        self.bar = ProgressBar(cfg.train.steps, initial=self.step,
                               enabled=self.layout.rank == 0 and cfg.logging.progress_bar)
        self.timer = Timer()
        if self.eval_splits and self.step == 0 and cfg.eval.at_start:  # the start policy's
            self.metrics.log(0, self.evaluate())
        while self.step < cfg.train.steps:
            self.train_step()
        self.bar.close()
        self.metrics.close()
        return self.policy.export_hf(os.path.join(self.run_dir, "hf_final")) \
            if cfg.checkpoint.export_hf else None

    def train_step(self) -> dict:
        """One step of the paper's loop (arXiv 2506.19767 section 4), logged and, when due,
        checkpointed; returns its metrics. A weight sync that failed for good stops the run
        after the step is saved."""
        from srft_mcore.rollout.errors import RolloutError

        cfg, timer = self.cfg, self.timer
        mark = self.rollouts.mark()
        try:
            with timer("rollout"):  # sample prompts, n rollouts each, score them; every rank
                indices, groups, rewards = self.rollouts.next_batch(self.step)
        except RolloutError as e:  # the servers could not be brought back: save, stop
            raise self.rollout_stopped(e, mark) from e
        # prompt groups (the demonstration joins its prompt's) and their advantages, Eq. 7
        seqs = build_sequences(self.dataset.batch(indices), groups, rewards, cfg.algorithm)
        lag = policy_lag(groups, trained_from=self.step)
        with timer("train"):
            self.engine.before_train()  # colocated: SGLang frees its GPU memory
            self.offloader.mark("train")
            self.offloader.restore()  # the state offloaded for the rollout
            parts, minis = self.policy.mini_batches(seqs)  # whole prompt groups each
            # old log-probs, the step's entropy H (for w_SFT, w_RL), the SGLang mismatch
            record = self.policy.old_policy_pass(minis)
            record.update(self.policy.update(parts, minis, record["entropy/step"],
                                             step=self.step + 1))  # the optimizer steps
        self.step += 1
        if self.rollouts.ahead is not None:
            with timer("rollout_wait"):  # the next batch, before the servers' weights change
                self.rollouts.finish_ahead()
        due = self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps
        more, saved = self.step < cfg.train.steps, None  # more: another rollout follows
        if more and self.offloader.active:
            if due:  # while the state is here and the servers' memory is still released
                saved = self.save()
            with timer("offload"):  # before the sync gives the servers their memory back
                self.offloader.offload(weights=False)
        self.offloader.mark("rollout")
        with timer("sync"):  # failed for good: the step is logged, saved, then we stop
            sync_error = self.sync_or_error()
        if more and self.offloader.what == "all":
            with timer("offload"):  # the weights too, once the servers have them
                self.offloader.offload()
        record.update(lag)
        if sync_error is None and self.eval_splits and (self.step % cfg.eval.every == 0
                                                        or self.step == cfg.train.steps):
            with timer("eval"):
                record.update(self.evaluate())
        record.update(rollout_metrics(groups, rewards, seqs))
        record.update(self.rollouts.reward_metrics())  # reward/timeouts
        record.update(self.engine.metrics())
        record.update(self.offloader.metrics(self.layout.cpu_group))  # mem/*, offload/*
        record.update(self._step_costs(seqs))
        record.update(step_ledger(groups, seqs))
        record.update(self.rollouts.dynamic_metrics())  # dynamic/*; its ledger: every round
        self.metrics.log(self.step, record)
        self.bar.update(record)
        if saved is None and (sync_error is not None or due):
            self.offloader.restore()  # (a failed sync stops the run: saved with its state)
            saved = self.save()
        if sync_error is not None:
            raise self.sync_stopped(sync_error, saved)
        return record

    def _step_costs(self, seqs) -> dict:
        """The step's phase times, training throughput, skip count and peak memory."""
        times = self.timer.pop()
        return {**times,
                "perf/train_tokens_per_s": sum(len(s.tokens) for s in seqs) / max(
                    times["time/train"], 1e-9),
                "train/skipped_total": self.policy.skipped_total,
                "perf/peak_mem_gb": peak_memory_gb(self.layout.cpu_group,
                                                   at_least=self.offloader.peak_gb)}

    def evaluate(self) -> dict:
        """Score the held-out splits through the live rollout servers (rank 0; every rank
        gets the result), ``eval/<split>/acc``."""
        from srft_mcore.evaluation.runner import evaluate_splits, paper_sampling
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

    # ------------------------------------------------------------------ weight sync
    def sync_or_error(self):
        """Push the policy to the servers (the engine retries a failed sync); returns the
        ``WeightSyncError`` of a sync that failed for good, else None. Collective."""
        from srft_mcore.rollout.errors import WeightSyncError

        try:
            self.engine.sync_weights(self.policy.model.module, version=str(self.step))
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

    def rollout_stopped(self, error, mark) -> TrainingStopped:
        """The paragraph a run stops with when generation failed for good (a server that
        stopped answering and, attached by URL, did not come back): the trained steps are
        saved, with the prompt draw rewound so that the resumed run makes this batch."""
        saved = None
        if self.step > 0:
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            if latest is not None and os.path.basename(latest) == f"step_{self.step:06d}":
                saved = latest
            else:
                self.offloader.restore()
                self.rollouts.rewind(mark)
                saved = self.save()
        kept = (f"The trained steps are saved in {saved}" if saved else
                "No step was trained, so there is nothing to save")
        return TrainingStopped(
            f"step {self.step + 1}: generating the rollouts failed for good: {error}. {kept}. "
            f"Fix: bring the server back (its log; restart it, or list another in "
            f"rollout.urls), then resume with: {resume_command(self.run_dir)} (overrides such "
            f"as rollout.urls=[...] may follow --config); it syncs the saved weights to the "
            f"servers before its first rollout")

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        p = self.policy
        state = {"skipped_total": p.skipped_total, "overflow_steps": p.overflow_steps,
                 "scheduler": p.scheduler.state_dict(), "weight_schedule": p.weight_state,
                 **self.rollouts.state_dict()}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, p.model.module, p.optimizer,
                                    state, keep=self.cfg.checkpoint.keep)
        log0(f"saved checkpoint {path}")
        return path

    def resume(self):
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            log0(f"checkpoint.resume=true but no checkpoint in {self.ckpt_dir}: starting fresh")
            return
        p = self.policy
        state = ckpt.load_checkpoint(path, p.model.module, p.optimizer)
        self.step = state["step"]
        p.skipped_total = state["skipped_total"]
        p.overflow_steps = state.get("overflow_steps", 0)  # (the loss scaler: optimizer state)
        p.weight_state = state.get("weight_schedule", {})  # the entropy averages, controller
        self.rollouts.load_state_dict(state)
        p.scheduler.load_state_dict(state["scheduler"])
        log0(f"resumed from {path} at step {self.step}")
        self.resumed = True

    def close(self):
        if self.engine is not None:
            self.engine.shutdown()
        if self.rollouts is not None:
            self.rollouts.close()  # the reward worker processes


def resume_command(run_dir: str) -> str:
    """The command that resumes this run: the run's own config.yaml (every override
    included) with --resume, launched as this process was."""
    args = f"--config {os.path.join(run_dir, 'config.yaml')} --resume"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return f"srft-train {args}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // max(local, 1)
    if nodes == 1:
        return f"srft-train --nproc-per-node {local} {args}"
    return (f"torchrun --nnodes={nodes} --nproc_per_node={local} (with this run's rendezvous "
            f"options, on every node) -m srft_mcore.training {args}")


def step_ledger(groups, seqs) -> dict:
    """What the step cost, for compute-matched comparisons: prompts drawn, rollout tokens
    generated, and the response tokens trained on (demonstrations and rollouts)."""
    trained = [(s.is_demo, len(s.tokens) - s.prompt_len) for s in seqs]
    return {"ledger/prompts": len(groups),
            "ledger/rollout_tokens": sum(len(c.token_ids) for g in groups for c in g),
            "ledger/demo_tokens": sum(n for demo, n in trained if demo),
            "ledger/trained_tokens": sum(n for _, n in trained)}


def peak_memory_gb(group=None, at_least: float = 0.0) -> float:
    """The trainer's peak memory so far, the largest over the ranks of ``group``: CUDA's peak
    allocation on GPU; on CPU the process's peak resident set (Python and libraries
    included, so an upper bound of what the model needs). ``at_least``: the peak of earlier
    phases (the offloader resets CUDA's counter per phase)."""
    if torch.cuda.is_available():
        value = max(torch.cuda.max_memory_allocated() / 1e9, at_least)
    else:
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux
    peak = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return float(peak.item())


# --------------------------------------------------------------------------- one rank
def parse_args(argv=None):
    import argparse

    return add_run_arguments(argparse.ArgumentParser(
        prog="srft-train", description="One trainer rank (srft-train --nproc-per-node N "
        "launches N of them under torchrun)")).parse_intermixed_args(argv)


def _input_errors() -> tuple:
    """Exceptions that mean the user's input is wrong: reported in one paragraph, exit 2."""
    from srft_mcore.data import DataError, TemplateError
    from srft_mcore.models import UnsupportedArchitecture
    from srft_mcore.models.name_map import BridgeError
    from srft_mcore.reward import RewardError
    from srft_mcore.rollout.server import ServerStartError
    from srft_mcore.rollout.errors import UnsupportedServer
    from srft_mcore.training.checkpoint import CheckpointError

    return (ConfigError, FileNotFoundError, DataError, TemplateError, RewardError, BridgeError,
            CheckpointError, UnsupportedArchitecture, ServerStartError, TrainingStopped,
            UnsupportedServer)


def main(argv=None) -> int:
    """One trainer rank (``python -m srft_mcore.training``; torchrun starts one per GPU)."""
    from srft_mcore.training.checkpoint import CheckpointError
    from srft_mcore.training.lifecycle import watch_launcher

    watch_launcher()  # under torchrun: this rank and its SGLang servers end with the launcher
    args = parse_args(argv)
    trainer = None
    try:
        cfg = load_checked_config(args.config, args.overrides, args.resume,
                                  world_size=int(os.environ.get("WORLD_SIZE", "1")))
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.train()
    except _input_errors() as e:
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
