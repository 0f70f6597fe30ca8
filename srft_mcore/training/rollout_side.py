"""The rollout side of a step: draw the prompts, sample ``rollout.n_samples`` continuations of
each through the SGLang servers, score them; and with ``rollout.overlap``, the next step's
rollout in a background thread while this step trains (one step off-policy).

Rank 0 talks to the servers and runs the reward (in ``reward.workers`` processes, each
answer within ``reward.timeout_s``: :mod:`srft_mcore.reward.pool`); the prompts' indices,
completions and rewards are broadcast so that every rank builds the same sequences. The
overlapped batch (made by weights a checkpoint no longer holds) is saved as JSON with the
checkpoint, so a resumed run trains on exactly the batch an uninterrupted one would have.
With ``rollout.dynamic_sampling`` a batch takes rounds of rollout calls until enough groups
have rewards that differ (:mod:`srft_mcore.training.dynamic_sampling`).
"""
from __future__ import annotations

import dataclasses

from srft_mcore.config import Config
from srft_mcore.launching.distributed import broadcast_object
from srft_mcore.training.messages import log0


class RolloutSide:
    """Prompts -> completions -> rewards for the trainer's steps.

    ``engine`` (the :class:`RolloutEngine`) is given once the servers run; the state saved
    with a checkpoint (:meth:`state_dict`) is the sampler's position, the count of rollout
    calls (each call's sampling seed) and the overlapped batch.
    """

    def __init__(self, cfg: Config, layout, tokenizer, dataset, sampler, reward_fn):
        self.cfg, self.layout, self.tokenizer = cfg, layout, tokenizer
        self.dataset, self.sampler, self.reward_fn = dataset, sampler, reward_fn
        self.engine = None
        self.rollout_calls = 0
        self.pending = None  # rollout.overlap: the next step's batch, made during this step
        self.ahead = None  # the background generation of that batch, while it runs
        # rank 0 scores in worker processes with a per-answer limit (reward.workers; None:
        # in this process). Answers over the limit score 0 and are counted per batch:
        self.reward_pool = None
        self.batch_timeouts = 0  # of the batch next_batch returned last (reward/timeouts)
        self.pending_timeouts = 0  # of self.pending
        # rollout.dynamic_sampling: the dynamic/* counts of that batch and of self.pending
        self.batch_dynamic, self.pending_dynamic = {}, {}
        if cfg is not None and layout.rank == 0 and cfg.reward.workers > 0:
            from srft_mcore.reward.pool import open_pool

            self.reward_pool = open_pool(cfg.reward.fn, cfg.reward.workers,
                                         cfg.reward.timeout_s, log=log0)

    def close(self) -> None:
        """Stop the reward workers (the trainer's close; also done at exit)."""
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None

    def reward_metrics(self) -> dict:
        """The step's count of answers that hit reward.timeout_s (rank 0's; 0 elsewhere)."""
        return {"reward/timeouts": self.batch_timeouts}

    def dynamic_metrics(self) -> dict:
        """rollout.dynamic_sampling: the step's dynamic/* counts, and its ledger/prompts and
        ledger/rollout_tokens over every round (empty without dynamic sampling)."""
        return dict(self.batch_dynamic)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"rollout_calls": self.rollout_calls, "sampler": self.sampler.state_dict(),
                "pending": pending_to_json(self.pending),
                "pending_dynamic": dict(self.pending_dynamic)}

    def load_state_dict(self, state: dict) -> None:
        self.rollout_calls = state["rollout_calls"]
        self.sampler.load_state_dict(state["sampler"])
        self.pending = pending_from_json(state.get("pending"))
        self.pending_dynamic = dict(state.get("pending_dynamic") or {})

    def mark(self) -> tuple:
        """Where the prompt draw and the sampling seeds stand (before a rollout)."""
        import copy

        return self.rollout_calls, copy.deepcopy(self.sampler.state_dict())

    def rewind(self, mark: tuple) -> None:
        """Back to :meth:`mark`: a checkpoint saved after a failed rollout then resumes with
        the batch that failed."""
        self.rollout_calls = mark[0]
        self.sampler.load_state_dict(mark[1])

    # ------------------------------------------------------------------ one batch
    def next_batch(self, step: int) -> tuple:
        """Step ``step + 1``'s prompt indices, completion groups and rewards (every rank
        gets them): made while the last step trained (rollout.overlap), else now. With
        overlap, the following step's rollout starts here too (:meth:`finish_ahead` joins it)."""
        cfg = self.cfg
        overlap = cfg.rollout.overlap
        if overlap and self.pending is not None:  # made while the last step trained
            batch, self.pending = self.pending, None
            self.batch_timeouts = self.pending_timeouts
            self.batch_dynamic = self.pending_dynamic
        else:
            batch = self.batch_now()
        if overlap and step + 1 < cfg.train.steps:
            self.start_ahead()
        return batch

    def sampling(self):
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
                                    sampling=sampling or self.sampling(),
                                    return_logprob=not self.cfg.rollout.seeded)

    def score(self, examples, groups):
        """Rank 0's rewards of each prompt's completions (others get None). A completion
        cut off by the length limit (``finish_reason == "length"``) gets 0 whatever the
        reward function says (it does not see the finish reason), as in evaluation."""
        return self.score_counted(examples, groups)[0]

    def score_counted(self, examples, groups) -> tuple:
        """``(rewards, timeouts)``: :meth:`score`'s rewards and how many answers scored 0
        for hitting reward.timeout_s. The whole step's completions form one batch, spread
        over the reward workers (sample indices in errors count across the step)."""
        if self.layout.rank != 0:
            return None, 0
        from srft_mcore.reward import score_batch

        flat = [(c, ex) for ex, comps in zip(examples, groups) for c in comps]
        args = ([c.text for c, _ in flat], [ex.answer for _, ex in flat],
                [ex.prompt for _, ex in flat], [c.finish_reason for c, _ in flat])
        if self.reward_pool is not None:
            scores, timeouts = self.reward_pool.score(*args)
        else:
            scores, timeouts = score_batch(self.reward_fn, *args), 0
        rewards, start = [], 0
        for comps in groups:
            rewards.append(scores[start:start + len(comps)])
            start += len(comps)
        return rewards, timeouts

    def batch_now(self):
        """Draw the step's prompts, generate and score them now (every rank gets them)."""
        if self.cfg.rollout.dynamic_sampling:
            batch, self.batch_dynamic, self.batch_timeouts = self.dynamic_batch()
            return batch
        indices = self.sampler.next_batch()
        examples = self.dataset.batch(indices)
        groups = self.rollout(examples)
        rewards, self.batch_timeouts = self.score_counted(examples, groups)
        # the other ranks wait here, on the gloo group with the long timeout
        groups, rewards = broadcast_object((groups, rewards), self.layout.cpu_group)
        return indices, groups, rewards

    # ------------------------------------------------------------------ dynamic sampling
    def collect_dynamic(self, generate) -> tuple:
        """rollout.dynamic_sampling's rounds (:func:`.dynamic_sampling.collect`), each
        ``generate(indices) -> (groups, rewards)``: ``(batch, stats)``."""
        from srft_mcore.training.dynamic_sampling import collect, counts_demo, demo_reward_of

        cfg = self.cfg

        def demo_rewards(indices):
            return [demo_reward_of(ex) for ex in self.dataset.batch(indices)]

        return collect(self.sampler.next_batch, generate, cfg.train.prompts_per_step,
                       cfg.rollout.max_resample_rounds,
                       multiple=cfg.train.mini_batches * (cfg.parallel.dp or 1),
                       demo_rewards=demo_rewards if counts_demo(cfg) else None, log=log0)

    def dynamic_batch(self) -> tuple:
        """Dynamic sampling now (collective): each round's groups and rewards are broadcast,
        so every rank keeps the same groups and draws the same prompts next. Returns
        ``(batch, stats, timeouts)``."""
        timeouts = [0]

        def generate(indices):
            examples = self.dataset.batch(indices)
            groups = self.rollout(examples)  # one rollout call, its own seed
            rewards, n = self.score_counted(examples, groups)
            timeouts[0] += n
            return broadcast_object((groups, rewards), self.layout.cpu_group)

        batch, stats = self.collect_dynamic(generate)
        return batch, stats, timeouts[0]

    # ------------------------------------------------------------------ overlapped rollout
    def start_ahead(self):
        """rollout.overlap: draw the next step's prompts and generate them in a background
        thread on rank 0 with the weights the servers hold now, while this step trains."""
        if self.cfg.rollout.dynamic_sampling:
            return self._start_ahead_dynamic()
        indices = self.sampler.next_batch()
        examples = self.dataset.batch(indices)
        sampling = self.sampling()
        box = {"indices": indices, "sampling": sampling}

        def work():
            groups = self.engine.client.generate(
                [ex.prompt_ids for ex in examples], n=self.cfg.rollout.n_samples,
                sampling=sampling, return_logprob=not self.cfg.rollout.seeded)
            self.engine._check_versions(groups)
            box["groups"] = groups
            box["rewards"], box["timeouts"] = self.score_counted(examples, groups)

        self._in_background(box, work)

    def _in_background(self, box: dict, work) -> None:
        """Run ``work`` in a thread on rank 0; an error goes to ``box["error"]``, and
        :meth:`finish_ahead` makes the batch again collectively."""
        import threading

        def guarded():
            try:
                work()
            except Exception as e:  # noqa: BLE001 - redone collectively in finish_ahead
                box["error"] = f"{type(e).__name__}: {e}"

        if self.layout.rank == 0:
            box["thread"] = threading.Thread(target=guarded, name="rollout-ahead", daemon=True)
            box["thread"].start()
        self.ahead = box

    def finish_ahead(self):
        """Join the background generation (collective) before the weights change and keep
        its batch for the next step; if it failed, generate the same prompts now with the
        same seed (the engine recovers dead servers), so the batch is the one an
        uninterrupted run would have drawn."""
        box, self.ahead = self.ahead, None
        if self.layout.rank == 0:
            box["thread"].join()
        error = broadcast_object(box.get("error"), self.layout.cpu_group)
        if "mark" in box:  # rollout.dynamic_sampling
            return self._finish_ahead_dynamic(box, error)
        examples = self.dataset.batch(box["indices"])
        if error is None:
            groups, rewards = broadcast_object((box.get("groups"), box.get("rewards")),
                                               self.layout.cpu_group)
            self.pending_timeouts = box.get("timeouts", 0)
        else:
            log0(f"background rollout failed ({error}); generating the batch again")
            groups = self.rollout(examples, box["sampling"])
            rewards, self.pending_timeouts = self.score_counted(examples, groups)
            groups, rewards = broadcast_object((groups, rewards), self.layout.cpu_group)
        self.pending = (box["indices"], groups, rewards)

    def _start_ahead_dynamic(self):
        """:meth:`start_ahead` with rollout.dynamic_sampling: rank 0 runs every round in the
        background thread (its sampler and call count advance there, the same way as
        :meth:`dynamic_batch`; :meth:`finish_ahead` hands them to the other ranks)."""
        box = {"mark": self.mark(), "timeouts": 0}  # where a failed run starts over
        cfg = self.cfg

        def generate(indices):
            examples = self.dataset.batch(indices)
            groups = self.engine.client.generate(
                [ex.prompt_ids for ex in examples], n=cfg.rollout.n_samples,
                sampling=self.sampling(), return_logprob=not cfg.rollout.seeded)
            self.engine._check_versions(groups)
            rewards, n = self.score_counted(examples, groups)
            box["timeouts"] += n
            return groups, rewards

        def work():
            box["batch"], box["stats"] = self.collect_dynamic(generate)

        self._in_background(box, work)

    def _finish_ahead_dynamic(self, box, error):
        """The background rounds' batch to every rank, with rank 0's sampler position and
        call count; if they failed, every rank goes back to where they started and runs them
        again now (same prompts, same seeds)."""
        if error is None:
            batch, stats, timeouts, position = broadcast_object(
                (box.get("batch"), box.get("stats"), box["timeouts"],
                 (self.rollout_calls, self.sampler.state_dict())), self.layout.cpu_group)
            self.rewind(position)
        else:
            log0(f"background rollout failed ({error}); generating the batch again")
            self.rewind(box["mark"])
            batch, stats, timeouts = self.dynamic_batch()
        self.pending, self.pending_dynamic, self.pending_timeouts = batch, stats, timeouts


# --------------------------------------------------------------------------- metrics and state
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
