"""Each SRFT term and weight on hand-computed examples, the algorithms, and split invariance."""
import dataclasses
import math
from functools import partial

import pytest
import torch

from srft_mcore.algo import losses as L
from srft_mcore.config import AlgorithmConfig

LN2, LN4 = math.log(2.0), math.log(4.0)


# --------------------------------------------------------------------------- equations
def test_sft_weight_eq8():
    h = torch.tensor([0.0, LN2], requires_grad=True)
    w = L.sft_weight(h, c_sft=0.5, sign=-1.0)
    assert torch.allclose(w, torch.tensor([0.5, 0.25])) and not w.requires_grad
    assert torch.allclose(L.sft_weight(h, 0.5, +1.0), torch.tensor([0.5, 1.0]))
    assert torch.allclose(L.sft_token_loss(torch.tensor([-LN2])), torch.tensor([LN2]))


def test_offpolicy_demo_term_eq9_10():
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    adv = torch.tensor([2.0])
    plain = L.offpolicy_demo_token_loss(logp, adv, "none")
    assert torch.allclose(plain, torch.tensor([-1.0]))  # -A * p
    (g,) = torch.autograd.grad(plain.sum(), logp)
    assert torch.allclose(g, torch.tensor([-1.0]))  # d(-A p)/dlogp = -A p
    shaped = L.offpolicy_demo_token_loss(logp, adv, "luffy", gamma=0.1)
    assert torch.allclose(shaped, torch.tensor([-2 * 0.5 / 0.6]))
    (g,) = torch.autograd.grad(shaped.sum(), logp)
    assert torch.allclose(g, torch.tensor([-2 * 0.1 * 0.5 / 0.6 ** 2]))  # -A gamma p/(p+g)^2
    with pytest.raises(ValueError):
        L.offpolicy_demo_token_loss(logp, adv, "bogus")


def test_rl_weight_and_sign_split_eq11_12():
    h = torch.tensor([math.log(3.0)], requires_grad=True)
    w = L.rl_weight(h, c_rl=0.1)
    assert torch.allclose(w, torch.tensor([0.3])) and not w.requires_grad
    # Eq. 11 with rewards +-1: advantage +1 on positive, -1 on negative samples; at ratio 1
    # the gradient is -grad log pi(y+) + grad log pi(y-)
    adv = L.sign_advantage(torch.tensor([True, False]))
    assert adv.tolist() == [1.0, -1.0]
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, ratio, _ = L.ppo_token_loss(logp, None, adv, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert ratio.tolist() == [1.0, 1.0] and g.tolist() == [-1.0, 1.0]


def test_kl_estimators_and_tis():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert L.kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2.0))
    d = math.log(0.5)  # log(ref / pi)
    assert L.kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)
    assert L.kl_penalty(lp, lp, "k3").item() == 0.0
    w = L.tis_weight(torch.log(torch.tensor([0.6, 0.9])), torch.log(torch.tensor([0.3, 0.6])),
                     cap=1.8)
    assert w.tolist() == pytest.approx([1.8, 1.5])  # 2.0 truncated at the cap


def test_ppo_form():
    logp = torch.full((2,), math.log(0.6))
    old = torch.full((2,), math.log(0.5))
    adv = torch.tensor([1.0, -1.0])
    loss, ratio, clipped = L.ppo_token_loss(logp, old, adv, clip_eps=0.1)
    assert torch.allclose(ratio, torch.tensor([1.2, 1.2]))
    assert torch.allclose(loss, torch.tensor([-1.1, 1.2]))  # pessimistic of clipped/unclipped
    assert clipped.tolist() == [True, False]
    loss, _, _ = L.ppo_token_loss(logp, old, adv, clip_eps=None)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.2]))
    # no old log-probs: ratio 1, gradient -A
    lp = logp.clone().requires_grad_()
    loss, ratio, _ = L.ppo_token_loss(lp, None, adv)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert torch.allclose(ratio, torch.ones(2)) and torch.allclose(g, -adv)


def test_aggregations():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert L.aggregate(loss, mask, "token-mean", 4, 2).item() == pytest.approx(10 / 4)
    assert L.aggregate(loss, mask, "seq-mean-token-mean", 4, 2).item() == pytest.approx(3.0)
    assert L.aggregate(loss, mask, "seq-sum-max-len", 4, 2, max_len=3).item() == \
        pytest.approx(10 / 6)
    # global counts: half the batch contributes its sum over the whole batch's count
    assert L.aggregate(loss[:1], mask[:1], "token-mean", 4, 2).item() == pytest.approx(6 / 4)


def test_entropy_for_weights():
    h = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert torch.equal(L.entropy_for_weights(h, "token"), h)
    assert torch.allclose(L.entropy_for_weights(h, "batch", 0.5), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="batch_entropy"):  # never a silent per-micro-batch mean
        L.entropy_for_weights(h, "batch")
    demo = torch.tensor([True, False])
    assert L.entropy_token_mask(mask, demo, "rollout").tolist() == [[0, 0], [1, 0]]
    assert L.entropy_token_mask(mask, demo, "demo").tolist() == [[1, 1], [0, 0]]
    assert torch.equal(L.entropy_token_mask(mask, demo, "all"), mask)


# --------------------------------------------------------------------------- full objective
def _batch():
    """One demonstration and two rollouts (reward 1 and 0) of two tokens; the last masked."""
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5], [0.25, 0.9]]))
    ent = torch.tensor([[0.0, LN2], [LN2, LN2], [0.0, 7.0]])
    batch = dict(loss_mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
                 is_demo=torch.tensor([True, False, False]),
                 advantages=torch.tensor([1.0, 0.5, -0.5]),
                 rewards=torch.tensor([1.0, 1.0, 0.0]))
    totals = L.batch_totals(batch["loss_mask"], batch["is_demo"], max_len=2)
    return logp, ent, batch, totals


def _loss(name, batch_entropy=None, **kw):
    logp, ent, batch, totals = _batch()
    totals.batch_entropy = batch_entropy
    kw.setdefault("entropy_weighting", "token" if batch_entropy is None else "batch")
    logp = logp.clone().requires_grad_()
    loss, metrics = L.srft_loss(logp, ent, batch, AlgorithmConfig(name=name, **kw), totals)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad, metrics


def test_batch_totals():
    _, _, _, t = _batch()
    assert (t.demo_tokens, t.rollout_tokens, t.demo_seqs, t.rollout_seqs) == (2, 3, 1, 2)


def test_srft_total_eq13():
    loss, grad, m = _loss("srft")
    sft = (0.5 * LN2 + 0.25 * LN4) / 2  # w_SFT = 0.5 exp(-H) over the 2 demo tokens
    off = -(1.0 * 0.5 + 1.0 * 0.25) / 5  # pooled with the 3 rollout tokens
    on = (-2 * 0.2 + 1) / 5  # -w_RL * (+1) * ratio 1 on the positive; -(-1) * 1 negative
    assert loss == pytest.approx(sft + off + on, abs=1e-6)
    for key, want in (("loss/sft", sft), ("loss/offpolicy", off), ("loss/onpolicy", on)):
        assert m[key][0].item() == pytest.approx(want, abs=1e-6) and m[key][1].item() == 1.0
    assert m["w_sft"].tolist() == pytest.approx([0.75, 2.0])
    assert m["w_rl"].tolist() == pytest.approx([0.4, 2.0])
    # demo token 0: SFT -w/2 plus off-policy -A p / 5; positive rollout: -w_RL / 5
    assert grad[0, 0].item() == pytest.approx(-0.5 / 2 - 0.5 / 5, abs=1e-6)
    assert grad[1, 0].item() == pytest.approx(-0.2 / 5, abs=1e-6)
    assert grad[2, 0].item() == pytest.approx(1 / 5, abs=1e-6)
    assert grad[2, 1].item() == 0.0  # masked


def test_srft_switches():
    sft_plus = (0.5 * LN2 + 1.0 * LN4) / 2  # sign +1: w = 0.5 exp(+H), under the cap 1
    off, on = -0.75 / 5, (-2 * 0.2 + 1) / 5
    assert _loss("srft", sft_entropy_sign=1.0)[0] == pytest.approx(sft_plus + off + on, abs=1e-6)
    off_luffy = -(0.5 / 0.6 + 0.25 / 0.35) / 5
    sft = (0.5 * LN2 + 0.25 * LN4) / 2
    assert _loss("srft", offpolicy_shaping="luffy")[0] == pytest.approx(
        sft + off_luffy + on, abs=1e-6)
    hb = 0.9  # the step's entropy, one scalar from the old-policy pass
    w_sft, w_rl = 0.5 * math.exp(-hb), 0.1 * math.exp(hb)
    want = w_sft * (LN2 + LN4) / 2 + off + (-2 * w_rl + 1) / 5
    loss, _, m = _loss("srft", batch_entropy=hb)
    assert loss == pytest.approx(want, abs=1e-6)
    assert m["w_sft"].tolist() == pytest.approx([2 * w_sft, 2.0])
    assert m["w_rl"].tolist() == pytest.approx([2 * w_rl, 2.0])
    # per-token weights are capped: 0.1 exp(7) = 110 -> token_weight_cap
    logp, ent, batch, totals = _batch()
    batch["loss_mask"][2, 1] = 1.0
    batch["rewards"][2] = 1.0  # the token with H = 7 is now a positive rollout token
    _, m = L.srft_loss(logp, ent, batch, AlgorithmConfig(entropy_weighting="token",
                                                         token_weight_cap=1.5), totals)
    assert m["w_rl"].tolist() == pytest.approx([0.2 * 2 + 0.1 + 1.5, 4.0])
    bonus = -0.01 * (3 * LN2) / 5
    assert _loss("srft", entropy_coef=0.01)[0] == pytest.approx(sft + off + on + bonus,
                                                                 abs=1e-6)
    seq = L.srft_loss(*_batch()[:3], AlgorithmConfig(loss_agg="seq-mean-token-mean",
                                                     entropy_weighting="token"),
                      _batch()[3])[0].item()
    want = (0.5 * LN2 + 0.25 * LN4) / 2 / 1 + (-0.75 / 2 - 0.2 + 1) / 3
    assert seq == pytest.approx(want, abs=1e-6)


def test_ablations_fix_the_weight_to_fixed_weight():
    off = -0.75 / 5
    no_wsft = 1.0 * (LN2 + LN4) / 2 + off + (-2 * 0.2 + 1) / 5  # w_SFT = 1.0 (default)
    assert _loss("srft_no_wsft")[0] == pytest.approx(no_wsft, abs=1e-6)
    no_wrl = (0.5 * LN2 + 0.25 * LN4) / 2 + off + (-2 * 1.0 + 1) / 5  # w_RL = 1.0
    assert _loss("srft_no_wrl")[0] == pytest.approx(no_wrl, abs=1e-6)
    no_wrl = (0.5 * LN2 + 0.25 * LN4) / 2 + off + (-2 * 0.3 + 1) / 5
    assert _loss("srft_no_wrl", fixed_weight=0.3)[0] == pytest.approx(no_wrl, abs=1e-6)


def test_baselines():
    loss, grad, m = _loss("sft")
    assert loss == pytest.approx((LN2 + LN4) / 2, abs=1e-6)
    assert grad[1:].abs().max() == 0  # rollouts are not trained
    loss, grad, m = _loss("grpo", loss_agg="token-mean")  # ratio 1: -A per rollout token
    assert loss == pytest.approx((-0.5 * 2 + 0.5) / 3, abs=1e-6)
    assert grad[0].abs().max() == 0 and grad[1, 0].item() == pytest.approx(-0.5 / 3)
    assert m["ppo/ratio"].tolist() == pytest.approx([3.0, 3.0])
    # the default is token-mean (verl's); DeepSeekMath's Eq. 3: per-sequence token means,
    # then their mean over sequences
    assert _loss("grpo")[0] == pytest.approx(loss, abs=1e-7)
    loss, grad, m = _loss("grpo", loss_agg="seq-mean-token-mean")
    assert loss == pytest.approx((-0.5 + 0.5) / 2, abs=1e-6)
    assert grad[1, 0].item() == pytest.approx(-0.5 / 2 / 2)


def test_srft_ppo_form_weights_positive_samples():
    logp, ent, batch, totals = _batch()
    batch["old_logprobs"] = logp - 0.1
    loss, m = L.srft_loss(logp, ent, batch, AlgorithmConfig(clip_eps=0.05,
                                                            entropy_weighting="token"),
                          totals, onpolicy_form="ppo")
    sft, off = (0.5 * LN2 + 0.25 * LN4) / 2, -0.75 / 5
    r = math.exp(0.1)  # ratio 1.105: the positive (A>0) is clipped at 1.05, the negative not
    on = (0.2 * -0.5 * 1.05 * 2 + 0.5 * r) / 5
    assert loss.item() == pytest.approx(sft + off + on, abs=1e-6)
    assert m["ppo/clipfrac"].tolist() == pytest.approx([2.0, 3.0])


def test_no_clipping_unless_configured_and_the_clip_fraction_by_hand():
    """Old log-probs away from the current ones: SRFT's defaults do not clip (clipfrac 0);
    GRPO's clip 0.2 clips the tokens whose ratio leaves [0.8, 1.2] in the pessimistic
    direction, and those tokens get no gradient."""
    logp, ent, batch, totals = _batch()
    shift = torch.tensor([[0.0, 0.0], [0.4, -0.1], [-0.5, 0.0]])  # log ratio per token
    batch["old_logprobs"] = logp - shift
    r = [math.exp(0.4), math.exp(-0.1), math.exp(-0.5)]  # 1.49, 0.90 (A > 0); 0.61 (A < 0)

    def run(name, **kw):
        x = logp.clone().requires_grad_()
        loss, m = L.srft_loss(x, ent, batch, AlgorithmConfig(name=name, **kw), totals)
        (g,) = torch.autograd.grad(loss, x)
        return loss.item(), g, m

    # srft (sign form, per-token w_RL = 0.1 exp(ln 2) = 0.2 on the positive rollout): no clip
    _, g, m = run("srft", entropy_weighting="token")
    assert m["ppo/clipfrac"].tolist() == [0.0, 3.0]
    on = (-0.2 * (r[0] + r[1]) + r[2]) / 5
    assert m["loss/onpolicy"][0].item() == pytest.approx(on, abs=1e-6)
    assert g[1, 0].item() == pytest.approx(-0.2 * r[0] / 5, abs=1e-6)  # unclipped at 1.49
    assert m["ppo/ratio_max"][0].item() == pytest.approx(r[0], rel=1e-6)
    # grpo (clip 0.2, per-sequence mean): 1.49 -> 1.2 and 0.61 -> 0.8 are clipped
    loss, g, m = run("grpo", entropy_weighting="token", loss_agg="seq-mean-token-mean")
    assert m["ppo/clipfrac"].tolist() == pytest.approx([2.0, 3.0])
    want = ((-0.5 * 1.2 - 0.5 * r[1]) / 2 + 0.5 * 0.8) / 2
    assert loss == pytest.approx(want, abs=1e-6)
    assert g[1, 0].item() == 0.0 and g[2, 0].item() == 0.0  # clipped: no gradient
    assert g[1, 1].item() == pytest.approx(-0.5 * r[1] / 2 / 2, abs=1e-6)


def test_tis_scales_the_onpolicy_loss_and_gradient_by_the_truncated_weight():
    """SGLang's log-probs 1.5x less likely than the trainer's: every rollout token's loss
    and gradient times min(1.5, cap); demonstration tokens untouched."""
    logp, ent, batch, totals = _batch()
    batch["old_logprobs"] = logp.clone()  # the first mini-batch: ratio 1
    batch["rollout_logprobs"] = logp - math.log(1.5)  # pi_old / pi_sglang = 1.5
    batch["rollout_logprob_mask"] = batch["loss_mask"] * ~batch["is_demo"].unsqueeze(-1)

    def run(name, cap):
        x = logp.clone().requires_grad_()
        loss, m = L.srft_loss(x, ent, batch, AlgorithmConfig(
            name=name, tis_cap=cap, entropy_weighting="token", loss_agg="token-mean"), totals)
        (g,) = torch.autograd.grad(loss, x)
        return loss.item(), g, m

    plain, g0, m0 = run("grpo", None)
    assert plain != 0 and g0.abs().sum() > 0 and "tis/weight" not in m0
    for cap, factor in ((2.0, 1.5), (1.2, 1.2)):  # under the cap, truncated at it
        loss, g, m = run("grpo", cap)
        assert loss == pytest.approx(factor * plain, rel=1e-6)
        assert torch.allclose(g, factor * g0, rtol=1e-6, atol=0)
        assert m["tis/weight"].tolist() == pytest.approx([3 * factor, 3.0])
    # SRFT: the on-policy term alone scales; SFT and the off-policy demo term do not
    _, g0, m0 = run("srft", None)
    _, g, m = run("srft", 2.0)
    assert m["loss/onpolicy"][0].item() == pytest.approx(1.5 * m0["loss/onpolicy"][0].item())
    for key in ("loss/sft", "loss/offpolicy"):
        assert m[key][0].item() == pytest.approx(m0[key][0].item(), abs=1e-7)
    assert torch.equal(g[0], g0[0])  # the demonstration's gradient
    assert torch.allclose(g[1:], 1.5 * g0[1:], rtol=1e-6, atol=0)
    # a token SGLang gave no log-prob for keeps weight 1
    batch["rollout_logprob_mask"][1, 1] = 0.0
    _, _, m = run("grpo", 2.0)
    assert m["tis/weight"].tolist() == pytest.approx([1.5 + 1.0 + 1.5, 3.0])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_by_hand_value_and_gradient(estimator):
    """KL to the reference on the rollout tokens, token-mean, times kl_coef: k1 = log pi -
    log pi_ref (gradient kl_coef / N per token), k3 = e^d - d - 1 with d = log pi_ref - log pi
    (gradient kl_coef (1 - e^d) / N)."""
    logp, ent, batch, totals = _batch()
    d = torch.tensor([[0.7, -0.4], [0.3, -0.2], [0.5, 0.9]])  # demo row, masked token: unused
    batch["ref_logprobs"] = logp + d
    rollout_d = [0.3, -0.2, 0.5]
    if estimator == "k1":
        per_token = [-x for x in rollout_d]
        grads = [1.0] * 3
    else:
        per_token = [math.exp(x) - x - 1 for x in rollout_d]
        grads = [1 - math.exp(x) for x in rollout_d]

    def run(coef):
        x = logp.clone().requires_grad_()
        loss, m = L.srft_loss(x, ent, batch, AlgorithmConfig(
            kl_coef=coef, kl_estimator=estimator, entropy_weighting="token"), totals)
        (g,) = torch.autograd.grad(loss, x)
        return loss.item(), g, m

    base, g0, _ = run(0.0)
    loss, g, m = run(0.1)
    kl = sum(per_token) / 3
    assert m["kl/ref"].tolist() == pytest.approx([sum(per_token), 3.0])
    assert m["loss/kl"][0].item() == pytest.approx(0.1 * kl, abs=1e-7)
    assert loss - base == pytest.approx(0.1 * kl, abs=1e-6)
    diff = g - g0
    got = [diff[1, 0].item(), diff[1, 1].item(), diff[2, 0].item()]
    assert got == pytest.approx([0.1 * x / 3 for x in grads], abs=1e-7)
    assert diff[0].abs().max() == 0 and diff[2, 1] == 0  # demonstration and masked token


def test_luffy_is_its_own_objective():
    """LUFFY (arXiv 2504.14945; mix_core_alg.py and the actor of its code base), from its
    own formula: the demonstration joins its group, advantages mean-centred (no std); rollout
    tokens -A * pi / pi_old, demonstration tokens -A * f(pi) with f(x) = x / (x + 0.1) and
    pi_beta = 1, neither clipped; one micro-batch's loss = token sum / padded response length
    - 0.001 * token mean of the entropy: the default sum-max-len. seq-sum-max-len is the
    same divided by the sequence count."""
    from srft_mcore.training.batching import build_sequences, make_micro_batches, sequence_totals
    from srft_mcore.data import Example

    ex = Example(index=0, prompt="p", prompt_text="p", prompt_ids=[1, 2], answer="0",
                 demonstration="demo", demo_ids=[30, 31, 32])

    class Rollout:
        def __init__(self, ids):
            self.token_ids, self.logprobs = ids, None

    cfg = AlgorithmConfig(name="luffy")
    seqs = build_sequences([ex], [[Rollout([10, 11]), Rollout([12, 13, 14]), Rollout([15])]],
                           [[1.0, 0.0, 0.0]], cfg)
    # rewards 1, 0, 0 and the demonstration's 1: mean 0.5, no division by the std
    assert [s.advantage for s in seqs] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    (mb,) = make_micro_batches(seqs, 4, 0, 1, pad_id=0)
    L_PAD = 4  # data.max_response_len: LUFFY pads every response to it
    totals = sequence_totals(seqs, max_len=L_PAD, batch_entropy=0.0)  # unused: no w_SFT, w_RL

    # per response token: the ratio pi / pi_old of the rollouts, pi of the demonstration
    ratio = [[1.5, 0.9], [0.5, 1.1, 1.0], [1.3]]
    demo_p = [0.5, 0.25, 0.9]
    ent = [[0.2, 0.4], [0.1, 0.3, 0.5], [0.7], [0.6, 0.8, 1.0]]
    adv = [0.5, -0.5, -0.5, 0.5]
    logp_bs = torch.zeros(4, 5)
    old_bs = torch.zeros(4, 5)
    ent_bs = torch.zeros(4, 5)
    for row in range(4):
        at = mb["loss_mask"][row].nonzero().flatten().tolist()
        probs = demo_p if row == 3 else [0.3 + 0.1 * k for k in range(len(at))]
        for k, pos in enumerate(at):
            logp_bs[row, pos] = math.log(probs[k])
            # the demonstration's old log-prob must not matter (pi_beta = 1)
            old_bs[row, pos] = logp_bs[row, pos] - (math.log(ratio[row][k]) if row < 3
                                                    else math.log(3.0))
            ent_bs[row, pos] = ent[row][k]
    mb["old_logprobs"] = old_bs

    def luffy_by_hand(clip=None):
        """The micro-batch's loss and its gradients (log-prob, entropy) per response token."""
        pg, g_logp = [], []
        for row in range(3):
            for r in ratio[row]:
                a = adv[row]
                clipped = r if clip is None else min(max(r, 1 - clip), 1 + clip)
                pg.append(max(-a * r, -a * clipped))  # PPO's pessimistic clip, if any
                g_logp.append(-a * r if -a * r >= -a * clipped else 0.0)
        for p in demo_p:
            pg.append(-adv[3] * p / (p + 0.1))
            g_logp.append(-adv[3] * 0.1 * p / (p + 0.1) ** 2)
        n_tok = sum(len(e) for e in ent)
        loss = sum(pg) / L_PAD - 0.001 * sum(sum(e) for e in ent) / n_tok
        return loss, [g / L_PAD for g in g_logp], -0.001 / n_tok

    def project(clip=None, agg=None):
        x = logp_bs.clone().requires_grad_()
        h = ent_bs.clone().requires_grad_()
        loss, m = L.srft_loss(x, h, mb, dataclasses.replace(cfg, clip_eps=clip, loss_agg=agg),
                              totals)
        gx, gh = torch.autograd.grad(loss, (x, h))
        mask = mb["loss_mask"].bool()
        return loss.item(), gx[mask].tolist(), gh[mask].tolist(), m

    n_seqs = 4
    for clip in (None, 0.2):  # LUFFY's script: no clip; its loss_remove_clip=False: 0.2
        want, want_gx, want_gh = luffy_by_hand(clip)
        loss, gx, gh, m = project(clip)
        assert loss == pytest.approx(want, abs=1e-6), clip
        assert gx == pytest.approx(want_gx, abs=1e-6), clip
        assert gh == pytest.approx([want_gh] * 9, abs=1e-9), clip
        loss, gx, gh, m = project(clip, "seq-sum-max-len")
        assert loss * n_seqs == pytest.approx(want, abs=1e-6), clip
        assert [g * n_seqs for g in gx] == pytest.approx(want_gx, abs=1e-6), clip
        assert [g * n_seqs for g in gh] == pytest.approx([want_gh] * 9, abs=1e-9), clip
    # with the clip: 1.5 (A > 0) and 0.5 (A < 0) are clipped, the demonstration never
    assert m["ppo/clipfrac"].tolist() == pytest.approx([2.0, 6.0])


# --------------------------------------------------------------------------- megatron glue
@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_loss_func_is_split_invariant(agg):
    """Megatron divides by the micro-batch count; the sum must equal the one-batch loss."""
    cfg = AlgorithmConfig(loss_agg=agg, entropy_coef=0.01)
    logp, ent, batch, totals = _batch()
    totals.batch_entropy = 0.7

    def run(splits, dp_size=1):
        x = logp.clone().requires_grad_()
        f = L.make_loss_func(cfg, totals, num_microbatches=len(splits) // dp_size,
                             dp_size=dp_size)
        total, metric_dicts = 0.0, []
        for sl in splits:
            mb = {k: v[sl] for k, v in batch.items()}
            loss, metrics = partial(f, mb)((x[sl], ent[sl]))
            total = total + loss / (len(splits) // dp_size) / dp_size  # schedule, DDP mean
            metric_dicts.append(metrics)
        (g,) = torch.autograd.grad(total, x)
        return total.item(), g, L.reduce_metrics(metric_dicts)

    one = run([slice(0, 3)])
    for splits, dp in (([slice(0, 1), slice(1, 3)], 1), ([slice(0, 1), slice(1, 2),
                                                           slice(2, 3)], 1),
                       ([slice(0, 2), slice(2, 3)], 2)):
        many = run(splits, dp)
        assert many[0] == pytest.approx(one[0], abs=1e-6)
        assert torch.allclose(many[1], one[1], atol=1e-6)
        for key in ("loss", "loss/sft", "loss/onpolicy", "w_sft", "entropy/rollout"):
            assert many[2][key] == pytest.approx(one[2][key], abs=1e-6)
    assert one[2]["loss"] == pytest.approx(one[0], abs=1e-6)


def test_overlap_correction_is_the_decoupled_objective_by_hand():
    """Under rollout.overlap the rollouts come from the behaviour policy (the weights before
    the last step; SGLang's log-probs), the old-policy pass gives the proximal policy: GRPO's
    token loss is -min(r A, clip(r) A) with r = pi / pi_prox, times the truncated weight
    min(pi_prox / pi_behav, cap). Here per rollout token (A = 0.5, 0.5, -0.5):
    r = 1.5, 0.8, 1.0 and pi_prox / pi_behav = 3.0 (truncated to 2), 0.5, 1.25."""
    from srft_mcore.config import RolloutConfig
    from srft_mcore.algo.defaults import behaviour_correction

    logp, ent, batch, totals = _batch()
    prox = logp.clone()
    prox[1, 0] -= math.log(1.5)
    prox[1, 1] -= math.log(0.8)
    behav = prox.clone()
    behav[1, 0] -= math.log(3.0)
    behav[1, 1] -= math.log(0.5)
    behav[2, 0] -= math.log(1.25)
    batch["old_logprobs"] = prox
    batch["rollout_logprobs"] = behav
    batch["rollout_logprob_mask"] = batch["loss_mask"] * ~batch["is_demo"].unsqueeze(-1)
    # the run's setting: null under overlap becomes the default cap, -1 stays off
    algo = behaviour_correction(AlgorithmConfig(name="grpo"), RolloutConfig(overlap=True))
    assert algo.tis_cap == 2.0
    assert behaviour_correction(AlgorithmConfig(name="grpo"),
                                RolloutConfig(overlap=True, seeded=True)).tis_cap is None
    assert behaviour_correction(AlgorithmConfig(name="grpo", tis_cap=-1),
                                RolloutConfig(overlap=True)).tis_cap is None
    assert behaviour_correction(AlgorithmConfig(name="grpo"), RolloutConfig()).tis_cap is None
    x = logp.clone().requires_grad_()
    loss, m = L.srft_loss(x, ent, batch, dataclasses.replace(
        algo, entropy_weighting="token", loss_agg="token-mean", clip_eps=0.2), totals)
    (g,) = torch.autograd.grad(loss, x)
    # token 1: r 1.5 -> clipped at 1.2 (A > 0), weight 2; token 2: r 0.8 (inside), weight
    # 0.5; token 3: r 1 (A < 0), weight 1.25
    want = (-(1.2 * 0.5) * 2.0 - (0.8 * 0.5) * 0.5 + (1.0 * 0.5) * 1.25) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert g[1, 0].item() == 0.0  # clipped: no gradient
    assert g[1, 1].item() == pytest.approx(-0.8 * 0.5 * 0.5 / 3, abs=1e-6)
    assert g[2, 0].item() == pytest.approx(1.0 * 0.5 * 1.25 / 3, abs=1e-6)
    assert m["tis/weight"].tolist() == pytest.approx([2.0 + 0.5 + 1.25, 3.0])


# --------------------------------------------------------------------------- schedules, B
def test_schedule_weights_replace_the_entropy_weights_on_every_token():
    """BatchTotals.weights (algorithm.weight_schedule): the step's two scalars weight every
    demonstration / positive rollout token, whatever the per-token entropy; the ablations
    keep their fixed side."""
    logp, ent, batch, totals = _batch()
    totals.weights = (0.3, 0.2)
    off = -0.75 / 5

    def loss(name, **kw):
        x = logp.clone().requires_grad_()
        out, m = L.srft_loss(x, ent, batch, AlgorithmConfig(name=name, entropy_weighting="token",
                                                            **kw), totals)
        return out.item(), m

    got, m = loss("srft")
    assert got == pytest.approx(0.3 * (LN2 + LN4) / 2 + off + (1 - 2 * 0.2) / 5, abs=1e-6)
    assert m["w_sft"].tolist() == pytest.approx([0.6, 2.0])
    assert m["w_rl"].tolist() == pytest.approx([0.4, 2.0])
    got, m = loss("srft_no_wsft")  # w_SFT stays fixed_weight (1.0), w_RL from the schedule
    assert got == pytest.approx(1.0 * (LN2 + LN4) / 2 + off + (1 - 2 * 0.2) / 5, abs=1e-6)
    got, m = loss("srft_no_wrl", fixed_weight=0.7)  # w_RL stays fixed_weight
    assert got == pytest.approx(0.3 * (LN2 + LN4) / 2 + off + (1 - 2 * 0.7) / 5, abs=1e-6)


def test_entropy_of_positive_and_negative_rollouts_by_hand():
    """entropy/rollout_pos|neg: the mean entropy over the rollout tokens of reward > 0 and
    <= 0; a side without tokens reduces to NaN (logged null), like w_rl."""
    for name in ("srft", "grpo", "sft"):
        _, _, m = _loss(name)
        # positive rollout: tokens of entropy ln2, ln2; negative: its one unmasked token, 0
        assert m["entropy/rollout_pos"].tolist() == pytest.approx([2 * LN2, 2.0]), name
        assert m["entropy/rollout_neg"].tolist() == pytest.approx([0.0, 1.0]), name
    logp, ent, batch, totals = _batch()
    batch["rewards"] = torch.tensor([1.0, 1.0, 1.0])  # no negative rollout
    halves = [L.srft_loss(logp[sl], ent[sl], {k: v[sl] for k, v in batch.items()},
                          AlgorithmConfig(entropy_weighting="token"), totals)[1]
              for sl in (slice(0, 2), slice(2, 3))]
    out = L.reduce_metrics(halves)  # summed over micro-batches, then divided
    assert out["entropy/rollout_pos"] == pytest.approx((2 * LN2 + 0.0) / 3)
    assert math.isnan(out["entropy/rollout_neg"])


# --------------------------------------------------------------------------- clip-higher
def test_decoupled_clip_by_hand():
    """algorithm.clip_eps_low / clip_eps_high (DAPO's clip-higher): the ratio is clamped to
    [1 - low, 1 + high]. Ratio 1.3 with A > 0 stops at 1.28; ratio 0.75 with A < 0 at 0.8;
    clipped tokens get no gradient; inside the range the loss is -A * ratio."""
    ratio = torch.tensor([1.3, 0.75, 1.25, 0.75])
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    old = torch.zeros(4)
    logp = ratio.log().requires_grad_()
    loss, r, clipped = L.ppo_token_loss(logp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert torch.allclose(r, ratio)
    # 1.25 < 1.28 is not clipped (the symmetric 0.2 would); A > 0 at 0.75: pessimistic min
    assert loss.tolist() == pytest.approx([-1.28, 0.8, -1.25, -0.75])
    assert clipped.tolist() == [True, True, False, False]
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert g.tolist() == pytest.approx([0.0, 0.0, -1.25, -0.75])
    # clip_eps_high None: the symmetric clip of before, 1.25 clipped at 1.2
    sym, _, _ = L.ppo_token_loss(logp, old, adv, clip_eps=0.2)
    assert sym.tolist() == pytest.approx([-1.2, 0.8, -1.2, -0.75])
    assert torch.equal(L.ppo_token_loss(logp, old, adv, 0.2, None)[0], sym)


def test_clip_range_from_the_config_and_in_the_loss():
    assert L.clip_range(AlgorithmConfig(name="grpo", clip_eps=0.2)) == (0.2, 0.2)
    assert L.clip_range(AlgorithmConfig(clip_eps=0.2, clip_eps_high=0.28)) == (0.2, 0.28)
    assert L.clip_range(AlgorithmConfig(clip_eps_low=0.1, clip_eps_high=0.3)) == (0.1, 0.3)
    assert L.clip_range(AlgorithmConfig()) == (None, None)  # srft: no clip
    with pytest.raises(ValueError, match="set both"):
        L.clip_range(AlgorithmConfig(clip_eps_high=0.3))
    # srft_loss passes the pair: ratio e^0.1 = 1.105 is clipped by 0.05 but not by 0.2
    logp, ent, batch, totals = _batch()
    batch["old_logprobs"] = logp - 0.1

    def clipfrac(**kw):
        cfg = AlgorithmConfig(name="grpo", entropy_weighting="token", **kw)
        return L.srft_loss(logp, ent, batch, cfg, totals)[1]["ppo/clipfrac"][0].item()

    assert clipfrac(clip_eps=0.05) > 0 and clipfrac(clip_eps=0.05, clip_eps_high=0.2) == 0
    assert clipfrac(clip_eps=0.05) == clipfrac(clip_eps_low=0.05, clip_eps_high=0.05)


def test_decoupled_clip_validation():
    from srft_mcore.config import ConfigError, load_config, validate

    a = validate(load_config(None, ["algorithm.name=grpo", "algorithm.clip_eps_high=0.28"]))
    assert (a.algorithm.clip_eps, a.algorithm.clip_eps_low, a.algorithm.clip_eps_high) == (
        0.2, None, 0.28)
    validate(load_config(None, ["algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.28"]))
    with pytest.raises(ConfigError, match=r"algorithm\.clip_eps_high=-0\.1: must be >= 0\. "
                                          r"Fix:"):
        validate(load_config(None, ["algorithm.name=grpo", "algorithm.clip_eps_high=-0.1"]))
    # srft clips nothing by default: one side alone has no other side
    with pytest.raises(ConfigError, match=r"algorithm\.clip_eps_high=0\.28: sets one side.*"
                                          r"Fix: set algorithm\.clip_eps_low too"):
        validate(load_config(None, ["algorithm.clip_eps_high=0.28"]))
    with pytest.raises(ConfigError, match=r"clip_eps_low=0\.2: sets one side.*name=luffy"):
        validate(load_config(None, ["algorithm.name=luffy", "algorithm.clip_eps_low=0.2"]))
