"""Each SRFT term and weight on hand-computed examples, the algorithms, and split invariance."""
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
    # GRPO's own aggregation (the default): mean over tokens per sequence, then sequences
    loss, grad, m = _loss("grpo")
    assert loss == pytest.approx((-0.5 + 0.5) / 2, abs=1e-6)
    assert grad[1, 0].item() == pytest.approx(-0.5 / 2 / 2)
    # LUFFY's defaults: p/(p+0.1) shaping, sum / max response length (2) per sequence over
    # the 3 sequences, entropy bonus 0.001 over every trained token
    loss, _, _ = _loss("luffy")
    rl = -(0.5 / 0.6 + 0.25 / 0.35) - 0.5 * 2 + 0.5
    assert loss == pytest.approx((rl - 0.001 * 3 * LN2) / (2 * 3), abs=1e-6)


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
