"""The paper's training step on the embedded policy, on real gloo ranks: the old-policy pass,
two optimizer mini-batches (ratio exactly 1, then not, then clipped), one batch entropy per
step over the configured token set, TIS and the KL penalty against hand values, and the
gradients and updated weights invariant over micro-batch sizes and DP. (The real SGLang
log-probs against the trainer's, with TIS, run in test_compare's SFT->RL test.)"""
import math

import pytest
import torch

from srft_mcore.launching.local import spawn_ranks

PROMPTS, ROLLOUTS = 4, 3
# (rewards of the 3 rollouts of each prompt): mixed, all wrong, all right, mixed
REWARDS = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]


def _synthetic_step(vocab: int, seed: int = 3):
    """The step's sequences through the trainer's own build_sequences: prompts of 5-8
    tokens, rollouts and demonstrations of 2-12 tokens, SGLang-like log-probs."""
    from srft_mcore.training.batching import build_sequences
    from srft_mcore.config import AlgorithmConfig
    from srft_mcore.rollout.client import Completion

    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    class Example:
        def __init__(self, i):
            self.index, self.prompt_ids, self.demo_ids = i, ids(5, 8), ids(2, 12)

    examples = [Example(i) for i in range(PROMPTS)]
    groups = []
    for _ in examples:
        comps = []
        for _ in range(ROLLOUTS):
            tok = ids(2, 12)
            comps.append(Completion(tok, "", (-torch.rand(len(tok), generator=g)).tolist(),
                                    "stop"))
        groups.append(comps)
    return build_sequences(examples, groups, REWARDS, AlgorithmConfig())


def _trainer(overrides):
    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer

    cfg = load_config(None, ["train.prompts_per_step=4", f"rollout.n_samples={ROLLOUTS}",
                             "data.max_response_len=16", "optimizer.grad_clip=0",
                             "parallel.use_distributed_optimizer=false", *overrides])
    return Trainer(cfg).init_policy()


def _logp_ent(t, micro):
    """(log-prob, entropy) of every micro-batch under the current weights (no grad)."""
    with torch.no_grad():
        return [t._policy_output(t.model, mb) for mb in micro]


def _grads(t):
    from srft_mcore.models.sharding import global_name

    m = t.model.module
    return {global_name(m, n): p.main_grad.detach().clone() for n, p in m.named_parameters()}


def _weights(t):
    from srft_mcore.models.sharding import global_name

    m = t.model.module
    return {global_name(m, n): p.detach().clone() for n, p in m.named_parameters()}


def _rollout_mask(mb):
    return (mb["loss_mask"] * ~mb["is_demo"].unsqueeze(-1)).bool()


def _hand_mean(values, masks):
    """sum(values * mask) / sum(mask) over micro-batches, in float64."""
    num = sum((v.double() * m).sum() for v, m in zip(values, masks))
    den = sum(m.double().sum() for m in masks)
    return (num / den).item()


# --------------------------------------------------------------------------- mini-batches
def _two_mini_batches_rank():
    from srft_mcore.algo.losses import batch_totals
    from srft_mcore.training.batching import split_mini_batches

    over = ["train.mini_batches=2", "train.micro_batch_size=4", "optimizer.lr=0.05",
            "algorithm.clip_eps=0.2"]
    t = _trainer(over)
    seqs = _synthetic_step(t.hf["vocab_size"])
    minis = [t._micro_batches(p) for p in split_mini_batches(seqs, 2)]
    h0 = _logp_ent(t, [mb for micro in minis for mb in micro])
    old = t.old_policy_pass(minis)
    # the step's entropy by hand: the mean over rollout tokens of the start policy
    num = sum(((e.double() * mb["loss_mask"]) * ~mb["is_demo"].unsqueeze(-1)).sum()
              for (_, e), mb in zip(h0, [mb for micro in minis for mb in micro]))
    den = sum((mb["loss_mask"] * ~mb["is_demo"].unsqueeze(-1)).sum()
              for micro in minis for mb in micro)
    out = {"entropy_step": old["entropy/step"], "entropy_hand": (num / den).item()}
    totals = [batch_totals(torch.cat([m["loss_mask"] for m in micro]),
                           torch.cat([m["is_demo"] for m in micro]), max_len=16,
                           batch_entropy=old["entropy/step"]) for micro in minis]
    first = t.train_batch(minis[0], totals[0])
    moved = _logp_ent(t, minis[1])  # the policy after the first update, on mini-batch 2
    second = t.train_batch(minis[1], totals[1])
    ratios, clipped = [], []
    for (lp, _), mb in zip(moved, minis[1]):
        roll = (mb["loss_mask"] * ~mb["is_demo"].unsqueeze(-1)).bool()
        r = torch.exp(lp.float() - mb["old_logprobs"])[roll]
        pos = (mb["rewards"] > 0).unsqueeze(-1).expand_as(lp)[roll]
        ratios.append(r)
        clipped.append(torch.where(pos, r > 1.2, r < 0.8))
    r, c = torch.cat(ratios), torch.cat(clipped).float()
    out.update(first=first, second=second, ratio_hand=r.mean().item(),
               ratio_max_hand=r.max().item(), clipfrac_hand=c.mean().item(),
               approx_kl_hand=(r.double() - r.double().log() - 1).mean().item(),  # k3
               old_equals_start=all(torch.equal(a[0].float(), mb["old_logprobs"])
                                    for a, mb in zip(h0, [mb for mi in minis for mb in mi])))
    # train_on composes exactly these pieces
    t2 = _trainer(over)
    out["step"] = t2.train_on(_synthetic_step(t2.hf["vocab_size"]))
    return out


@pytest.mark.slow
def test_two_mini_batches_ratio_one_then_moved_and_clipped():
    out = spawn_ranks(_two_mini_batches_rank, 1, timeout_s=300)[0]
    first, second = out["first"], out["second"]
    assert out["old_equals_start"]  # the old-policy pass is the start policy, bit for bit
    assert first["ppo/ratio"] == 1.0 and first["ppo/ratio_max"] == 1.0
    assert first["ppo/clipfrac"] == 0.0 and first["ppo/approx_kl"] == 0.0
    assert second["ppo/ratio"] != 1.0
    assert second["ppo/ratio"] == pytest.approx(out["ratio_hand"], rel=1e-5)
    assert second["ppo/ratio_max"] == pytest.approx(out["ratio_max_hand"], rel=1e-5)
    assert second["ppo/clipfrac"] == pytest.approx(out["clipfrac_hand"], abs=1e-6)
    assert second["ppo/clipfrac"] > 0  # lr 0.05 moves the policy past the 0.2 clip
    assert second["ppo/approx_kl"] == pytest.approx(out["approx_kl_hand"], rel=1e-4)
    assert out["entropy_step"] == pytest.approx(out["entropy_hand"], rel=1e-6)
    step = out["step"]
    assert step["entropy/step"] == out["entropy_step"]
    assert step["ppo/ratio"] == pytest.approx((1.0 + second["ppo/ratio"]) / 2, rel=1e-6)
    assert step["ppo/ratio_max"] == pytest.approx(second["ppo/ratio_max"], rel=1e-6)
    # one entropy for the whole step: the same weights on both mini-batches
    h = out["entropy_step"]
    for upd in (first, second, step):
        assert upd["w_sft"] == pytest.approx(0.5 * math.exp(-h), rel=1e-6)
        assert upd["w_rl"] == pytest.approx(0.1 * math.exp(h), rel=1e-6)
    assert "mismatch/logprob_abs_diff" in step and step["mismatch/logprob_abs_diff_max"] > 0


# --------------------------------------------------------------------------- entropy tokens
def _entropy_tokens_rank():
    t = _trainer(["train.micro_batch_size=4"])
    seqs = _synthetic_step(t.hf["vocab_size"])
    micro = t._micro_batches(seqs)
    ent = [e for _, e in _logp_ent(t, micro)]
    sets = {"rollout": [_rollout_mask(mb) for mb in micro],
            "demo": [(mb["loss_mask"] * mb["is_demo"].unsqueeze(-1)).bool() for mb in micro],
            "all": [mb["loss_mask"].bool() for mb in micro]}
    out = {}
    for which, masks in sets.items():
        t.cfg.algorithm.entropy_tokens = which
        out[which] = (t.old_policy_pass([micro])["entropy/step"], _hand_mean(ent, masks))
    # a step without demonstrations (GRPO's): entropy_tokens=demo falls back to every token
    rollouts = [s for s in seqs if not s.is_demo]
    micro = t._micro_batches(rollouts)
    ent = [e for _, e in _logp_ent(t, micro)]
    out["demo, none in the step"] = (t.old_policy_pass([micro])["entropy/step"],
                                     _hand_mean(ent, [mb["loss_mask"] for mb in micro]))
    return out


@pytest.mark.slow
def test_step_entropy_is_the_mean_over_the_entropy_tokens():
    out = spawn_ranks(_entropy_tokens_rank, 1, timeout_s=300)[0]
    for which, (step, hand) in out.items():
        assert step == pytest.approx(hand, rel=1e-6), which
    hands = [out[w][1] for w in ("rollout", "demo", "all")]
    assert min(abs(a - b) for i, a in enumerate(hands) for b in hands[i + 1:]) > 1e-3


# --------------------------------------------------------------------------- TIS
def _tis_rank():
    """GRPO (the on-policy term alone), lr 0: the same weights for every call. SGLang's
    log-probs set 1.5x less likely than the old policy's on every rollout token."""
    from srft_mcore.training.batching import sequence_totals

    t = _trainer(["algorithm.name=grpo", "algorithm.loss_agg=token-mean", "optimizer.lr=0.0",
                  "train.micro_batch_size=4"])
    seqs = [s for s in _synthetic_step(t.hf["vocab_size"]) if not s.is_demo]
    micro = t._micro_batches(seqs)
    old = t.old_policy_pass([micro])
    for mb in micro:
        have = mb["rollout_logprob_mask"] > 0
        mb["rollout_logprobs"] = torch.where(have, mb["old_logprobs"] - math.log(1.5),
                                             mb["rollout_logprobs"])
    totals = sequence_totals(seqs, max_len=16, batch_entropy=old["entropy/step"])
    have = sum(mb["rollout_logprob_mask"].sum().item() for mb in micro)
    out = {"covered": have / sum(_rollout_mask(mb).sum().item() for mb in micro)}
    for cap in (None, 2.0, 1.2):
        t.cfg.algorithm.tis_cap = cap
        out[cap] = (t.train_batch(micro, totals), _grads(t))
    return out


@pytest.mark.slow
def test_tis_scales_the_step_loss_and_gradient():
    out = spawn_ranks(_tis_rank, 1, timeout_s=300)[0]
    assert out["covered"] == 1.0  # SGLang gave a log-prob for every rollout token
    plain, g0 = out[None]
    assert "tis/weight" not in plain and plain["loss"] != 0
    scale = max(v.abs().max().item() for v in g0.values())
    assert scale > 0
    for cap, factor in ((2.0, 1.5), (1.2, 1.2)):  # min(pi_old / pi_sglang, cap)
        rec, g = out[cap]
        assert rec["tis/weight"] == pytest.approx(factor, rel=1e-6)
        assert rec["loss"] == pytest.approx(factor * plain["loss"], rel=1e-5)
        diff = max((g[k] - factor * g0[k]).abs().max().item() for k in g0)
        assert diff <= 1e-5 * scale, (cap, diff, scale)


# --------------------------------------------------------------------------- split invariance
def _split_rank(micro_batch_size):
    t = _trainer([f"train.micro_batch_size={micro_batch_size}", "optimizer.lr=1e-3"])
    start = _weights(t) if t.layout.dp_rank == 0 else None
    rec = t.train_on(_synthetic_step(t.hf["vocab_size"]))
    if t.layout.dp_rank:
        return None
    return {"record": rec, "grads": _grads(t), "start": start, "weights": _weights(t)}


@pytest.mark.slow
def test_step_gradients_and_weights_do_not_depend_on_micro_batches_or_dp():
    """One optimizer step on the same batch: the loss terms, the gradients and the updated
    weights are the same for every micro-batch size and DP size."""
    base = spawn_ranks(_split_rank, 1, (16,), timeout_s=300)[0]
    rec0, g0, w0 = base["record"], base["grads"], base["weights"]
    assert rec0["loss"] != 0 and rec0["w_sft"] > 0 and rec0["w_rl"] > 0
    # Adam's first step moves every weight with a gradient by about the learning rate
    step = max((w0[k] - base["start"][k]).abs().max().item() for k in w0)
    assert step == pytest.approx(1e-3, rel=0.01)
    runs = [(1, 1), (1, 4), (2, 1), (2, 4), (2, 16)]  # (DP ranks, micro-batch size)
    for world, mbs in runs:
        got = spawn_ranks(_split_rank, world, (mbs,), timeout_s=300)[0]
        rec, g, w = got["record"], got["grads"], got["weights"]
        assert all(torch.equal(got["start"][k], base["start"][k]) for k in w0)
        # the updated weights, element by element. Adam's first step is lr * g / (|g| + eps):
        # where |g| >> eps (1e-8) it does not feel float noise of the gradient; near eps it
        # magnifies it (a few elements here), so those are held to the step size only
        clear = n_clear = 0
        for k in w0:
            diff = (w[k] - w0[k]).abs()
            sure = torch.minimum(g[k].abs(), g0[k].abs()) > 1e-5
            clear, n_clear = clear + sure.sum().item(), n_clear + sure.numel()
            assert diff[sure].max() <= 1e-6, (world, mbs, k, diff[sure].max().item())
            assert diff.max() <= 2.01 * step, (world, mbs, k)
        assert clear >= 0.9 * n_clear  # nearly every weight is held to 1e-6 (lr 1e-3)
        for key in ("loss", "loss/sft", "loss/offpolicy", "loss/onpolicy", "w_sft", "w_rl",
                    "entropy/step"):
            assert rec[key] == pytest.approx(rec0[key], rel=1e-6), (world, mbs, key)
        scale = max(v.abs().max().item() for v in g0.values())
        diff = max((g[k] - g0[k]).abs().max().item() for k in g0)
        assert diff <= 1e-6 * scale, (world, mbs, diff, scale)


# --------------------------------------------------------------------------- loss in the kernel
IN_KERNEL_CASES = [  # every algorithm and loss aggregation, the entropy bonus, the KL term
    ["algorithm.name=srft", "algorithm.entropy_coef=0.01", "algorithm.kl_coef=0.1",
     "algorithm.clip_eps=0.2"],
    ["algorithm.name=srft", "algorithm.entropy_weighting=batch",
     "algorithm.onpolicy_form=ppo"],
    ["algorithm.name=grpo", "algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.name=luffy", "algorithm.loss_agg=seq-sum-max-len",
     "algorithm.entropy_coef=0.01"],
    ["algorithm.name=sft", "algorithm.loss_agg=sum-max-len"],
]


def _in_kernel_step(t):
    """One optimizer step on the synthetic batch with old log-probs moved off the current
    policy (noise of +-0.4), so that ratios spread and clip as on a later mini-batch."""
    seqs = _synthetic_step(t.hf["vocab_size"])
    parts, minis = t.mini_batches(seqs)
    record = t.old_policy_pass(minis)
    g = torch.Generator().manual_seed(5)
    for mb in minis[0]:
        old = mb["old_logprobs"]
        mb["old_logprobs"] = old + (torch.rand(old.shape, generator=g) - 0.5) * 0.8
    record.update(t.update(parts, minis, record["entropy/step"]))
    return record


def _in_kernel_rank():
    """Per case: the step's metrics and gradients with the loss formed inside the kernel
    and with autograd through the kernel's outputs; and whether the kernel ever fell back
    to its second pass (a loss that is not a sum of per-token terms)."""
    import warnings

    from srft_mcore.ops import logprob_entropy

    # chunks of 5 tokens: each micro-batch's loss is formed over several chunks
    logprob_entropy._spans = lambda n, v, size, keep, dev, _f=logprob_entropy._spans: _f(
        n, v, 5, keep, dev)
    calls = []  # the kernel's loss evaluations (one per chunk and one at the end)
    logprob_entropy._token_grads = lambda *a, _f=logprob_entropy._token_grads: (
        calls.append(1) or _f(*a))
    out = []
    for case in IN_KERNEL_CASES:
        runs = {}
        for in_kernel in (True, False):
            t = _trainer([*case, "optimizer.lr=1e-3", f"model.loss_in_kernel={in_kernel}"])
            logprob_entropy._NOT_SEPARABLE_WARNED.clear()
            calls.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                rec = _in_kernel_step(t)
            runs[in_kernel] = {"record": rec, "grads": _grads(t), "calls": len(calls),
                               "fallback": any("per-token terms" in str(x.message)
                                               for x in seen)}
        out.append(runs)
    # negative control: a term coupling the tokens stops the step before the optimizer
    import srft_mcore.algo.losses as losses

    real = losses.srft_loss
    losses.srft_loss = lambda lp, ent, *a, **k: (lambda loss, m: (
        loss + lp.mean() ** 2, m))(*real(lp, ent, *a, **k))
    t = _trainer(["optimizer.lr=1e-3"])
    start = _weights(t)
    try:
        t.train_on(_synthetic_step(t.hf["vocab_size"]))
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    losses.srft_loss = real
    out.append({"refused": refused, "unchanged": all(
        torch.equal(v, start[k]) for k, v in _weights(t).items())})
    return out


@pytest.mark.slow
def test_loss_in_the_kernel_equals_autograd_through_its_outputs():
    """The default path (the loss's gradient formed chunk by chunk in the kernel's forward)
    gives every algorithm's step the metrics and gradients of autograd through the
    log-probs and entropies, and never needs the kernel's second pass. A loss term that
    couples the tokens stops the step with the fix, before any weight moves."""
    *cases, coupled = spawn_ranks(_in_kernel_rank, 1, (), timeout_s=300)[0]
    assert "not a sum of per-token terms" in coupled["refused"], coupled
    assert "model.loss_in_kernel=false" in coupled["refused"] and coupled["unchanged"]
    for case, runs in zip(IN_KERNEL_CASES, cases):
        fast, plain = runs[True], runs[False]
        assert not fast["fallback"] and not plain["fallback"], case
        assert fast["calls"] > 2 * 8 and plain["calls"] == 0, case  # 8+ chunks a step
        assert fast["record"]["loss"] != 0, case
        if "algorithm.clip_eps=0.2" in case or "algorithm.name=grpo" in case:
            assert plain["record"]["ppo/clipfrac"] > 0, case  # the clipped branch is in
        for key, value in plain["record"].items():
            if isinstance(value, float) and math.isfinite(value) and key.startswith(
                    ("loss", "w_", "entropy", "ppo/", "logp")):
                assert fast["record"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), \
                    (case, key)
        scale = max(v.abs().max().item() for v in plain["grads"].values())
        assert scale > 0, case
        diff = max((fast["grads"][k] - plain["grads"][k]).abs().max().item()
                   for k in plain["grads"])
        assert diff <= 1e-5 * scale, (case, diff, scale)


# --------------------------------------------------------------------------- KL
def _kl_rank():
    """Per estimator: (a) the KL and its loss term on the second mini-batch, after the first
    update moved the policy, against the hand value from the moved log-probs; (b) its
    gradient at the reference (the start weights, lr 0): k1's is kl_coef times the gradient
    of the mean rollout log-prob, k3's is zero (e^d - d - 1 is flat at d = 0)."""
    import torch.distributed as dist

    from srft_mcore.training.batching import sequence_totals, split_mini_batches

    out = {}
    for est in ("k1", "k3"):
        t = _trainer(["algorithm.kl_coef=0.1", f"algorithm.kl_estimator={est}",
                      "optimizer.lr=0.05", "train.mini_batches=2", "parallel.timeout_s=300",
                      "parallel.wait_timeout_s=4000"])
        seqs = _synthetic_step(t.hf["vocab_size"])
        parts = split_mini_batches(seqs, 2)
        minis = [t._micro_batches(p) for p in parts]
        old = t.old_policy_pass(minis)
        totals = [sequence_totals(p, max_len=16, batch_entropy=old["entropy/step"])
                  for p in parts]
        first = t.train_batch(minis[0], totals[0])
        moved = _logp_ent(t, minis[1])
        second = t.train_batch(minis[1], totals[1])
        kl, masks = [], []
        for (lp, _), mb in zip(moved, minis[1]):
            d = mb["ref_logprobs"].double() - lp.double()  # log pi_ref - log pi
            kl.append(-d if est == "k1" else torch.exp(d) - d - 1)
            masks.append(_rollout_mask(mb))
        out[est] = {"first": first, "second": second, "hand": _hand_mean(kl, masks),
                    "ref_is_start": all(torch.equal(mb["ref_logprobs"], mb["old_logprobs"])
                                        for micro in minis for mb in micro),
                    "ref_frozen": all(not p.requires_grad for p in t.ref_model.parameters()),
                    "moved": max((a - b).abs().max().item() for a, b in
                                 zip(t.model.module.parameters(), t.ref_model.parameters())),
                    "cpu_group": dist.get_backend(t.layout.cpu_group)}

        # (b) GRPO at the reference: advantages 0 leave the KL term alone; without KL,
        # advantages -1 give the gradient of the token-mean rollout log-prob (ratio 1)
        t = _trainer(["algorithm.name=grpo", "algorithm.loss_agg=token-mean",
                      "algorithm.kl_coef=0.1", f"algorithm.kl_estimator={est}",
                      "optimizer.lr=0.0"])
        rollouts = [s for s in seqs if not s.is_demo]
        micro = t._micro_batches(rollouts)
        old = t.old_policy_pass([micro])
        totals = sequence_totals(rollouts, max_len=16, batch_entropy=old["entropy/step"])
        for mb in micro:
            mb["advantages"] = torch.zeros_like(mb["advantages"])
        kl_only = t.train_batch(micro, totals)
        g_kl = _grads(t)
        t.cfg.algorithm.kl_coef = 0.0
        for mb in micro:
            mb["advantages"] = torch.full_like(mb["advantages"], -1.0)
        t.train_batch(micro, totals)
        out[est].update(kl_only=kl_only, g_kl=g_kl, g_logp=_grads(t))
    return out


@pytest.mark.slow
def test_kl_to_the_frozen_start_policy_by_hand():
    out = spawn_ranks(_kl_rank, 1, timeout_s=300)[0]
    for est in ("k1", "k3"):
        o = out[est]
        first, second = o["first"], o["second"]
        # the reference is the start policy: no KL on the first mini-batch
        assert o["ref_is_start"] and first["kl/ref"] == 0.0 and first["loss/kl"] == 0.0
        # after one update: the estimator's value on the moved log-probs, times kl_coef
        assert o["hand"] != 0
        assert second["kl/ref"] == pytest.approx(o["hand"], rel=1e-5), est
        assert second["loss/kl"] == pytest.approx(0.1 * o["hand"], rel=1e-5), est
        assert o["ref_frozen"] and o["moved"] > 0
        # ranks wait for rollouts on a gloo group (not NCCL), with its own timeout
        assert o["cpu_group"] == "gloo"
        assert o["kl_only"]["loss"] == 0.0  # at the reference both estimators are 0
    assert out["k3"]["hand"] > 0  # k3 >= 0; k1 can take either sign
    g_kl, g_logp = out["k1"]["g_kl"], out["k1"]["g_logp"]
    scale = max(v.abs().max().item() for v in g_logp.values())
    assert scale > 0
    assert max((g_kl[k] - 0.1 * g_logp[k]).abs().max().item() for k in g_kl) <= 1e-5 * scale
    assert max(v.abs().max().item() for v in out["k3"]["g_kl"].values()) <= 1e-6 * scale


# --------------------------------------------------------------------------- packing
def _per_sequence_logprobs(t, micro):
    """{sequence tokens: its trained positions' old log-probs} from one old-policy pass."""
    t.old_policy_pass([micro])
    out = {}
    if not t.layout.is_last_stage:
        return out
    for mb in micro:
        for r in range(mb["tokens"].shape[0]):
            for k in mb["seq_ids"][r].unique().tolist():
                at = (mb["seq_ids"][r] == k) & (mb["loss_mask"][r] > 0)
                if at.any():
                    key = tuple(mb["tokens"][r][mb["seq_ids"][r] == k].tolist())
                    out[key] = mb["old_logprobs"][r][at]
    return out


def _packed_rank(tp, pp, budget):
    """Padded and packed micro-batches of the same step under one layout: log-probs per
    sequence, the step's metrics and this rank's gradient shard."""
    out = {}
    for name, extra in (("padded", ["train.micro_batch_size=4"]),
                        ("packed", [f"train.max_tokens_per_micro_batch={budget}"])):
        t = _trainer([f"parallel.tp={tp}", f"parallel.pp={pp}", "optimizer.lr=0.0",
                      "data.max_prompt_len=8", *extra])
        seqs = _synthetic_step(t.hf["vocab_size"])
        micro = t._micro_batches(seqs)
        out[name] = {"logp": _per_sequence_logprobs(t, micro),
                     "rows": sum(mb["tokens"].shape[0] for mb in micro),
                     "width": micro[0]["tokens"].shape[1],
                     "record": t.train_on(seqs), "grads": _grads(t)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_packed_equals_padded(world, tp, pp):
    for res in spawn_ranks(_packed_rank, world, (tp, pp, 48), timeout_s=300):
        padded, packed = res["padded"], res["packed"]
        assert packed["rows"] < padded["rows"] == 16  # several sequences per packed row
        assert padded["logp"].keys() == packed["logp"].keys()
        for key, lp in padded["logp"].items():
            assert torch.allclose(packed["logp"][key], lp, rtol=1e-6, atol=1e-6), key
        for k in ("loss", "loss/sft", "loss/onpolicy", "w_sft", "w_rl", "entropy/step"):
            assert packed["record"][k] == pytest.approx(padded["record"][k], rel=1e-6), k
        scale = max(v.abs().max().item() for v in padded["grads"].values())
        diff = max((packed["grads"][k] - v).abs().max().item()
                   for k, v in padded["grads"].items())
        assert diff <= 1e-6 * scale, (tp, pp, diff, scale)


# --------------------------------------------------------------------------- overlap
@pytest.mark.slow
def test_overlapped_rollout_is_one_step_behind_and_resumes_exactly(tmp_path, shared_sglang):
    from test_trainer import attached, final_weights, kill_after_checkpoint, metrics, run, stable

    over = ("train.steps=4", "rollout.overlap=true")
    ref = str(tmp_path / "uninterrupted")
    with shared_sglang.lease() as url:  # each run finds the shared server as freshly started
        run(ref, *over, *attached(url))
    rows = metrics(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1 has no earlier weights; every later sample comes from the step before
    assert rows[0]["rollout/policy_lag_max"] == 0
    for r in rows[1:]:
        assert r["rollout/policy_lag_min"] == r["rollout/policy_lag_max"] == 1, r["step"]

    killed = str(tmp_path / "killed")
    with shared_sglang.lease() as url:
        kill_after_checkpoint(killed, 2, *over, *attached(url))
    with shared_sglang.lease() as url:
        run(killed, *over, *attached(url), "--resume")
    got = metrics(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(rows, got):
        a, b = stable(a), stable(b)
        for k in a:
            assert (a[k] is None) == (b[k] is None), (a["step"], k)
            if a[k] is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
    wa, wb = final_weights(ref), final_weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- eval
@pytest.mark.slow
def test_eval_during_training_logs_and_plots_held_out_accuracy(tmp_path, sglang_url):
    import json
    import os

    from srft_mcore.training.plot import plot_run
    from test_trainer import attached, metrics, run

    run_dir = str(tmp_path / "eval")
    run(run_dir, "train.steps=2", "eval.every=1", "eval.limit=6", "checkpoint.export_hf=false",
        *attached(sglang_url))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the start policy
    for r in rows:
        for split in ("id", "ood"):
            acc = r[f"eval/{split}/acc"]
            assert 0.0 <= acc <= 1.0
            # the logged accuracy is the fraction of correct generations written for it
            with open(os.path.join(run_dir, "eval", f"step_{r['step']:06d}",
                                   f"{split}.jsonl")) as f:
                gens = [json.loads(line) for line in f]
            assert len(gens) == 6
            assert acc == pytest.approx(sum(g["correct"] for g in gens) / len(gens))
    assert any(p.endswith("eval.png") for p in plot_run(run_dir))
