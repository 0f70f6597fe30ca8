"""The baselines' scales as their code computes them (GRPO's token-mean default, LUFFY's
sum / max length with a token-mean entropy bonus), Eq. 11's logged value, and the refusal
of dropout with a ratio to the old policy."""
import math
from functools import partial

import pytest
import torch

from srft_mcore.algo import losses as L
from srft_mcore.algo.defaults import DEFAULTS, SOURCES
from srft_mcore.config import AlgorithmConfig, ConfigError, load_config, validate


def test_grpo_and_luffy_defaults_name_their_source():
    assert DEFAULTS["grpo"]["loss_agg"] == "token-mean"
    assert "loss_agg_mode" in SOURCES["grpo"] and "seq-mean-token-mean" in SOURCES["grpo"]
    assert DEFAULTS["luffy"]["loss_agg"] == "sum-max-len"
    assert "loss_remove_token_mean" in SOURCES["luffy"]
    assert "rollout.n_samples=7" in SOURCES["luffy"]
    assert {"sum-max-len", "seq-sum-max-len", "seq-mean-token-mean"} <= set(L.AGGREGATIONS)
    # the config accepts every aggregation the loss knows
    for agg in L.AGGREGATIONS:
        assert load_config(None, [f"algorithm.loss_agg={agg}"]).algorithm.loss_agg == agg
        validate(load_config(None, [f"algorithm.loss_agg={agg}"]))


# --------------------------------------------------------------------------- LUFFY's scale
MAX_LEN = 4
RATIO = [[1.5, 0.9], [0.5, 1.1, 1.0], [1.3]]  # pi / pi_old per rollout token
DEMO_P = [0.5, 0.25, 0.9]
ADV = [0.5, 0.5, -0.5, -0.5]  # demonstration, then three rollouts
ENT = [[0.6, 0.8, 1.0], [0.2, 0.4], [0.1, 0.3, 0.5], [0.7]]


def _luffy_batch():
    """A demonstration (3 tokens) and rollouts of 2, 3 and 1 tokens, padded to 3."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    logp, old, ent = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
    for row in range(4):
        n = int(mask[row].sum())
        probs = DEMO_P if row == 0 else [0.3 + 0.1 * k for k in range(n)]
        for k in range(n):
            logp[row, k] = math.log(probs[k])
            # the demonstration's old log-prob must not matter (pi_beta = 1)
            shift = math.log(3.0) if row == 0 else math.log(RATIO[row - 1][k])
            old[row, k] = logp[row, k] - shift
            ent[row, k] = ENT[row][k]
    batch = dict(loss_mask=mask, is_demo=torch.tensor([True, False, False, False]),
                 advantages=torch.tensor(ADV), rewards=torch.tensor([1.0, 1.0, 0.0, 0.0]),
                 old_logprobs=old)
    totals = L.batch_totals(mask, batch["is_demo"], max_len=MAX_LEN, batch_entropy=0.0)
    return logp, ent, batch, totals


def _token_losses():
    """-A * ratio on rollout tokens, -A * p / (p + 0.1) on the demonstration's."""
    out = [-ADV[0] * p / (p + 0.1) for p in DEMO_P]
    for row, ratios in enumerate(RATIO, start=1):
        out += [-ADV[row] * r for r in ratios]
    return out


def _run(agg, coef=0.0):
    logp, ent, batch, totals = _luffy_batch()
    x, h = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    cfg = AlgorithmConfig(name="luffy", loss_agg=agg, entropy_coef=coef)
    loss, m = L.srft_loss(x, h, batch, cfg, totals)
    gx, gh = torch.autograd.grad(loss, (x, h), allow_unused=True)  # no bonus: h unused
    return loss.item(), gx, gh, m


def test_sum_max_len_is_the_token_sum_over_max_len():
    loss, gx, _, m = _run("sum-max-len")
    want = sum(_token_losses()) / MAX_LEN
    assert loss == pytest.approx(want, abs=1e-6)
    # not divided by the sequence count: n_seqs times seq-sum-max-len, value and gradient
    n_seqs = 4
    loss_seq, gx_seq, _, _ = _run("seq-sum-max-len")
    assert loss == pytest.approx(n_seqs * loss_seq, abs=1e-6) and loss != pytest.approx(loss_seq)
    assert torch.allclose(gx, n_seqs * gx_seq, atol=1e-7)
    # by hand: a rollout token's gradient is -A * ratio / max_len (ratio d/dlogp = ratio)
    assert gx[1, 0].item() == pytest.approx(-0.5 * 1.5 / MAX_LEN, abs=1e-6)
    assert gx[1, 2].item() == 0.0  # padding
    assert L.aggregate(torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]),
                       torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), "sum-max-len", 4, 2,
                       max_len=3).item() == pytest.approx(10 / 3)


def test_sum_max_len_entropy_bonus_is_a_token_mean():
    coef = 0.01
    n_tok = sum(len(e) for e in ENT)
    mean_h = sum(sum(e) for e in ENT) / n_tok
    loss, _, gh, m = _run("sum-max-len", coef)
    assert m["loss/entropy_bonus"][0].item() == pytest.approx(-coef * mean_h, abs=1e-8)
    assert loss == pytest.approx(sum(_token_losses()) / MAX_LEN - coef * mean_h, abs=1e-6)
    mask = _luffy_batch()[2]["loss_mask"].bool()
    assert gh[mask].tolist() == pytest.approx([-coef / n_tok] * n_tok, abs=1e-10)
    assert gh[~mask].abs().max() == 0
    # seq-sum-max-len divides its bonus by the sequence count as well
    _, _, _, m_seq = _run("seq-sum-max-len", coef)
    assert m_seq["loss/entropy_bonus"][0].item() == pytest.approx(-coef * mean_h / 4, abs=1e-8)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_sum_max_len_split_into_micro_batches_sums_to_the_whole(dp_size):
    """Two micro-batches (one rank, or one per DP rank): their shares, through Megatron's
    division by the micro-batch count and DDP's mean, add up to the one-batch loss."""
    logp, ent, batch, totals = _luffy_batch()
    cfg = AlgorithmConfig(name="luffy", entropy_coef=0.01)  # sum-max-len by default

    def run(splits, dp=1):
        x = logp.clone().requires_grad_()
        n_micro = len(splits) // dp
        f = L.make_loss_func(cfg, totals, num_microbatches=n_micro, dp_size=dp)
        total, dicts = 0.0, []
        for sl in splits:
            loss, m = partial(f, {k: v[sl] for k, v in batch.items()})((x[sl], ent[sl]))
            total = total + loss / n_micro / dp
            dicts.append(m)
        (g,) = torch.autograd.grad(total, x)
        return total.item(), g, L.reduce_metrics(dicts)

    one = run([slice(0, 4)])
    two = run([slice(0, 2), slice(2, 4)], dp_size)
    assert one[0] == pytest.approx(sum(_token_losses()) / MAX_LEN
                                   - 0.01 * sum(map(sum, ENT)) / 9, abs=1e-6)
    assert two[0] == pytest.approx(one[0], abs=1e-6)
    assert torch.allclose(two[1], one[1], atol=1e-7)
    for key in ("loss", "loss/onpolicy", "loss/offpolicy", "loss/entropy_bonus"):
        assert two[2][key] == pytest.approx(one[2][key], abs=1e-7), key


# --------------------------------------------------------------------------- Eq. 11's value
POS_P = [[0.5, 0.4], [0.8]]  # the positive rollouts' token probabilities (row 2: 1 token)
NEG_P = [[0.3, 0.6]]


def _eq11_batch(rewards=(1.0, 1.0, 0.0)):
    """A demonstration and three rollouts (rewards as given), two positions each."""
    p = [[0.9, 0.7], [0.5, 0.4], [0.8, 0.2], [0.3, 0.6]]
    logp = torch.log(torch.tensor(p))
    ent = torch.tensor([[0.1, 0.2], [0.3, 0.5], [0.4, 9.0], [1.0, 2.0]])
    batch = dict(loss_mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
                 is_demo=torch.tensor([True, False, False, False]),
                 advantages=torch.tensor([0.6, 0.6, 0.6, -1.2]),
                 rewards=torch.tensor([1.0, *rewards]))
    batch["old_logprobs"] = logp.clone()
    return logp, ent, batch


def _eq11_logged(name, splits=(slice(0, 4),), h=0.5, **kw):
    logp, ent, batch = _eq11_batch(kw.pop("rewards", (1.0, 1.0, 0.0)))
    totals = L.batch_totals(batch["loss_mask"], batch["is_demo"], max_len=2, batch_entropy=h)
    cfg = AlgorithmConfig(name=name, **kw)
    f = L.make_loss_func(cfg, totals, num_microbatches=len(splits), dp_size=1)
    dicts = [partial(f, {k: v[sl] for k, v in batch.items()})((logp[sl], ent[sl]))[1]
             for sl in splits]
    return L.reduce_metrics(dicts)


def _mean_log(ps):
    flat = [math.log(p) for row in ps for p in row]
    return sum(flat) / len(flat)


@pytest.mark.parametrize("form", ["sign", "ppo"])
@pytest.mark.parametrize("name, w", [("srft", 0.1 * math.exp(0.5)),
                                     ("srft_no_wsft", 0.1 * math.exp(0.5)),
                                     ("srft_no_wrl", 0.7)])
def test_eq11_is_logged_beside_the_surrogate(name, w, form):
    """loss/eq11 = -w_RL * mean log pi(y+) + mean log pi(y-), the batch's H = 0.5."""
    want = -w * _mean_log(POS_P) + _mean_log(NEG_P)
    for splits in ((slice(0, 4),), (slice(0, 2), slice(2, 4))):
        m = _eq11_logged(name, splits, onpolicy_form=form, fixed_weight=0.7)
        assert m["loss/eq11"] == pytest.approx(want, abs=1e-6)
        assert m["eq11/positive"] == pytest.approx(w * _mean_log(POS_P), abs=1e-6)
        assert m["eq11/negative"] == pytest.approx(_mean_log(NEG_P), abs=1e-6)
    if form == "sign":  # the surrogate at ratio 1, pooled over 5 rollout + 2 demo tokens
        assert m["loss/onpolicy"] == pytest.approx((-w * 3 + 2) / 7, abs=1e-6)
        assert m["loss/onpolicy"] != pytest.approx(m["loss/eq11"], abs=1e-3)


def test_eq11_per_token_weights_and_an_empty_side():
    # entropy_weighting=token: w_t = min(0.1 exp(H_t), cap) inside the positive mean
    m = _eq11_logged("srft", entropy_weighting="token", token_weight_cap=1.0)
    w = [[0.1 * math.exp(0.3), 0.1 * math.exp(0.5)], [0.1 * math.exp(0.4)]]
    pos = sum(wt * math.log(p) for wr, pr in zip(w, POS_P) for wt, p in zip(wr, pr)) / 3
    assert m["loss/eq11"] == pytest.approx(-pos + _mean_log(NEG_P), abs=1e-6)
    # no negative rollouts: that side contributes 0 (its own mean is NaN)
    m = _eq11_logged("srft", rewards=(1.0, 1.0, 1.0))
    w = 0.1 * math.exp(0.5)
    assert math.isnan(m["eq11/negative"])
    assert m["loss/eq11"] == pytest.approx(-w * _mean_log(POS_P + NEG_P), abs=1e-6)
    # no positive rollouts
    m = _eq11_logged("srft", rewards=(0.0, 0.0, 0.0))
    assert m["loss/eq11"] == pytest.approx(_mean_log(POS_P + NEG_P), abs=1e-6)
    # baselines have no Eq. 11
    assert "loss/eq11" not in _eq11_logged("grpo") and "loss/eq11" not in _eq11_logged("luffy")


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("key", ["model.hidden_dropout", "model.attention_dropout"])
@pytest.mark.parametrize("name", ["srft", "grpo", "luffy", "srft_no_wrl"])
@pytest.mark.parametrize("minis", [1, 2])
def test_dropout_is_refused_with_a_ratio_to_the_old_policy(key, name, minis):
    """The old-policy pass (eval mode) gives pi_old for every mini-batch, the first too, so
    dropout breaks ratio = 1 whatever train.mini_batches is."""
    cfg = load_config(None, [f"{key}=0.1", f"algorithm.name={name}",
                             f"train.mini_batches={minis}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert f"{key}=0.1" in msg and f"train.mini_batches={minis}" in msg
    assert "Fix: set model.hidden_dropout=0 and model.attention_dropout=0" in msg


def test_dropout_allowed_where_no_ratio_is_taken():
    validate(load_config(None, ["model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                                "algorithm.name=sft", "train.mini_batches=2"]))
    validate(load_config(None, ["algorithm.name=srft", "train.mini_batches=2"]))
    cfg = validate(load_config(None, ["model.hidden_dropout=0.0", "algorithm.name=grpo"]))
    assert cfg.model.hidden_dropout == 0.0


# --------------------------------------------------------------------------- in a step
def _eq11_step_rank():
    """One training step (one mini-batch: pi = pi_old, so log pi is the old-policy pass's
    log-probs): the step record's loss/eq11 against the hand value from those log-probs."""
    from test_train_step import _synthetic_step, _trainer

    t = _trainer(["train.micro_batch_size=3"])
    seqs = _synthetic_step(t.hf["vocab_size"])
    parts, minis = t.mini_batches(seqs)
    record = t.old_policy_pass(minis)
    pos, neg = [], []
    for mb in minis[0]:
        roll = (mb["loss_mask"] * ~mb["is_demo"].unsqueeze(-1)).bool()
        good = (mb["rewards"] > 0).unsqueeze(-1).expand_as(roll)
        pos.append(mb["old_logprobs"][roll & good].double())
        neg.append(mb["old_logprobs"][roll & ~good].double())
    pos, neg = torch.cat(pos), torch.cat(neg)
    w = 0.1 * math.exp(record["entropy/step"])
    step = t.update(parts, minis, record["entropy/step"])
    return {"eq11": step["loss/eq11"], "n_pos": pos.numel(), "n_neg": neg.numel(),
            "hand": (-w * pos.mean() + neg.mean()).item(), "onpolicy": step["loss/onpolicy"]}


@pytest.mark.slow
def test_eq11_reaches_the_step_record():
    from srft_mcore.launching.local import spawn_ranks

    out = spawn_ranks(_eq11_step_rank, 1, timeout_s=300)[0]
    assert out["n_pos"] > 0 and out["n_neg"] > 0
    assert out["eq11"] == pytest.approx(out["hand"], rel=1e-5)
    assert out["eq11"] != pytest.approx(out["onpolicy"], rel=1e-2)
