"""Each algorithm's defaults, as its own paper or code defines it: one table.

A field of ``AlgorithmConfig`` left null (None) takes the value in this table for the
configured ``algorithm.name``; a value the user sets always wins. The README reproduces the
table; ``SOURCES`` says where each value comes from.
"""
from __future__ import annotations

import dataclasses

# field -> value, per algorithm. clip_eps None = no clipping.
DEFAULTS = {
    "srft": dict(onpolicy_form="sign", clip_eps=None, adv_std_norm=True,
                 offpolicy_shaping="none", loss_agg="token-mean", entropy_coef=0.0),
    "srft_no_wsft": dict(onpolicy_form="sign", clip_eps=None, adv_std_norm=True,
                         offpolicy_shaping="none", loss_agg="token-mean", entropy_coef=0.0),
    "srft_no_wrl": dict(onpolicy_form="sign", clip_eps=None, adv_std_norm=True,
                        offpolicy_shaping="none", loss_agg="token-mean", entropy_coef=0.0),
    "sft": dict(onpolicy_form="ppo", clip_eps=None, adv_std_norm=True,
                offpolicy_shaping="none", loss_agg="token-mean", entropy_coef=0.0),
    "grpo": dict(onpolicy_form="ppo", clip_eps=0.2, adv_std_norm=True,
                 offpolicy_shaping="none", loss_agg="token-mean", entropy_coef=0.0),
    "luffy": dict(onpolicy_form="ppo", clip_eps=None, adv_std_norm=False,
                  offpolicy_shaping="luffy", loss_agg="sum-max-len", entropy_coef=0.001),
}

SOURCES = {
    "srft": "arXiv 2506.19767 sec. 4: Eq. 7 std-normalised group advantages with the demo in "
            "the group, Eq. 9-10 with pi_beta=1 and no shaping, Eq. 11 sign form, no entropy "
            "bonus, no KL; no clip, as in the LUFFY code base the paper builds on "
            "(exp_scripts/train.sh: loss_remove_clip=True)",
    "srft_no_wsft": "as srft, with w_SFT fixed to algorithm.fixed_weight (1.0)",
    "srft_no_wrl": "as srft, with w_RL fixed to algorithm.fixed_weight (1.0)",
    "sft": "demonstrations only, token-mean negative log-likelihood",
    "grpo": "arXiv 2402.03300 Eq. 3: clipped ratio (0.2, the PPO convention; verl "
            "actor.yaml clip_ratio); token-mean aggregation, verl's default loss_agg_mode, "
            "which the SRFT paper's and LUFFY's code build on (DeepSeekMath's per-sequence "
            "mean 1/G sum_i 1/|o_i| sum_t: algorithm.loss_agg=seq-mean-token-mean); KL off, "
            "as in the SRFT paper's GRPO baseline (set algorithm.kl_coef=0.04 for the "
            "DeepSeekMath setting)",
    "luffy": "LUFFY exp_scripts/train.sh: grpo_use_std=False, off_policy_reshape=p_div_p_0.1, "
             "loss_remove_clip=True, loss_remove_token_mean=True (a micro-batch's masked "
             "token sum / the padded max response length, with one micro-batch per "
             "mini-batch: sum-max-len, the mini-batch's token sum / max length; "
             "seq-sum-max-len also divides by the sequence count), entropy_coeff=0.001 on a "
             "token mean of the entropy, use_kl_loss=False; mix_core_alg.py pools on- and "
             "off-policy tokens in one sum. Its groups of 7 rollouts + 1 demonstration: "
             "rollout.n_samples=7 with algorithm.demo_in_group=true",
}

FIELDS = tuple(next(iter(DEFAULTS.values())))


def resolve(algo):
    """A copy of ``algo`` (an AlgorithmConfig) with its null fields filled from the table.

    clip_eps: an explicit negative value means "no clipping"; it stays negative, so that
    resolving again (validation does) or resuming from the saved config keeps it off instead
    of filling in the algorithm's default (:func:`srft_mcore.algo.losses.clip_range`).
    """
    table = DEFAULTS[algo.name]
    filled = {f: table[f] for f in FIELDS if getattr(algo, f) is None}
    return dataclasses.replace(algo, **filled)


OVERLAP_TIS_CAP = 2.0
"""The truncation of the behaviour-policy importance weight under rollout.overlap."""


def behaviour_correction(algo, rollout):
    """``algo`` with ``tis_cap`` settled for the run: under ``rollout.overlap`` the rollouts
    come from the weights before the last step (the behaviour policy, whose log-probs SGLang
    returns) while the old-policy pass gives the proximal policy's; the decoupled objective
    (Hilton et al. 2021, "Batch size-invariance for policy optimization"; AReaL) clips the
    ratio to the proximal policy and weights each token by min(pi_prox / pi_behav, cap).
    That is ``tis_cap``, so a null ``tis_cap`` becomes :data:`OVERLAP_TIS_CAP` under
    overlap with unseeded rollouts (seeded ones report no behaviour log-probs). A negative
    ``tis_cap`` means off and becomes None."""
    cap = algo.tis_cap
    if cap is None and rollout.overlap and not rollout.seeded:
        cap = OVERLAP_TIS_CAP
    elif cap is not None and cap < 0:
        cap = None
    return dataclasses.replace(algo, tis_cap=cap)


def markdown_table() -> str:
    """The table as markdown (the README's copy is checked against it by a test)."""
    names = list(DEFAULTS)
    rows = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|" + "---|" * len(names)]
    for f in FIELDS:
        rows.append(f"| {f} | " + " | ".join(str(DEFAULTS[n][f]) for n in names) + " |")
    return "\n".join(rows)
