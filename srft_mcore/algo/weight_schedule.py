"""Entropy-weight schedules (``algorithm.weight_schedule``): where the step's w_SFT and
w_RL come from. Each schedule is one pure function (state, step entropy H, cfg) ->
(weights, new state) on Python floats (no torch: the config validation imports this).

The paper's weights (arXiv 2506.19767, Eq. 8 and 12) are a negative feedback on the policy
entropy: SFT on demonstrations raises the entropy, RL on positive rollouts lowers it (the
paper's entropy analysis), so w_SFT = c_sft exp(-H) grows and w_RL = c_rl exp(H) shrinks as
H falls, slowing a collapse, and the other way round. Every schedule below keeps that
direction and that form; they differ in the entropy the form is evaluated at (``h_eff``):

- ``exp`` (default): the paper's, unchanged: per-token H_t or the step's H
  (``algorithm.entropy_weighting``); the loss computes it, no state, no ``schedule/*``
  metrics (the logged ``w_sft`` / ``w_rl`` are the weights).
- ``ema``: h_eff = an exponential moving average of the step entropy,
  h_t = a h_{t-1} + (1 - a) H_t, a = 0.5 ** (1 / ``entropy_ema_halflife``), h_1 = H_1.
  The step's own entropy enters its weights, as in ``exp``'s batch mode (a -> 0 is exactly
  that mode). Unbounded, as ``exp`` (H <= ln V).
- ``ema2``: two averages of the step entropy, fast (``entropy_ema_halflife``) and slow
  (``entropy_ema_slow_halflife``), both started at H_1; the trend d = h_fast - h_slow
  (< 0: the entropy is falling faster than its slow level) moves the effective entropy:
  h_eff = h_slow + k d, k = ``entropy_trend_gain``. A falling entropy thus gets more SFT and
  less positive-sample RL before the level has come down (k = 0: the slow average alone;
  k = 1: the fast one's weights; k > 1 leads: for a steady ramp, k = L_s / (L_s - L_f) with
  L = a / (1 - a) the lag of an average in steps tracks the ramp without lag). Both weights
  are clamped to [``weight_min``, ``weight_max``].
- ``target``: integral control of the entropy towards ``target_entropy`` (H*; null: the
  first step's entropy, kept in the state, so the controller holds the start policy's):
  h_eff_t = clamp(h_eff_{t-1} + g (H_t - H*), lo, hi), h_eff_0 = H*, g = ``target_gain``,
  with [lo, hi] = [ln(weight_min / c_rl), ln(weight_max / c_rl)], the range in which w_RL
  stays inside the bounds (the integrator stops there: no wind-up). An entropy below the
  target lowers log w_RL by g (H* - H_t) per step and raises log w_SFT by as much (w_SFT w_RL
  = c_sft c_rl, as in Eq. 8 x Eq. 12), so SFT pushes the entropy up and RL on positives
  stops pulling it down; at the target the weights are the paper's at H = H*. w_SFT is
  also clamped to the bounds. (h_eff is the controller's state, not an entropy: it may go
  below 0.)
- ``fixed``: w_SFT = w_RL = ``fixed_weight``, no entropy (the study's fixed-weights arm;
  ``srft_no_wsft`` / ``srft_no_wrl`` fix only one of the two).

For ``ema``, ``ema2``, ``target`` and ``fixed`` the weights are per-step scalars, used for
every token of the step (every mini-batch, micro-batch and rank), and w_SFT honours
``sft_entropy_sign`` (w_SFT = c_sft exp(s h_eff)). The ablations keep their fixed side:
``srft_no_wsft`` takes only w_RL from the schedule, ``srft_no_wrl`` only w_SFT.

The state is a JSON-able dict of floats, updated once per step in the trainer with the
step's entropy from the old-policy pass, before the update uses the weights, and saved in
the checkpoint so that a resumed run continues exactly. A state of another schedule (a
resume that changed it) or none starts the schedule afresh; a non-finite H (a step without
trained tokens) leaves the state as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("exp", "ema", "ema2", "target", "fixed")
"""The values of ``algorithm.weight_schedule``."""
ENTROPY_SCHEDULES = ("ema", "ema2", "target")
"""Schedules that read the step's one entropy (they need ``entropy_weighting=batch``)."""


@dataclass(frozen=True)
class StepWeights:
    """The step's weights, one scalar each; ``h_eff``: the entropy the paper's form was
    evaluated at (None: ``fixed``)."""

    w_sft: float
    w_rl: float
    h_eff: Optional[float] = None


def decay(halflife: float) -> float:
    """Per-step decay of an average whose memory halves every ``halflife`` steps."""
    return 0.5 ** (1.0 / halflife)


def ema_update(prev: Optional[float], h: float, a: float) -> float:
    """a prev + (1 - a) h; the first finite value starts it; a non-finite h keeps it."""
    if prev is None or not math.isfinite(prev):
        return h
    if not math.isfinite(h):
        return prev
    return a * prev + (1.0 - a) * h


def paper_weights(h: float, cfg) -> tuple:
    """Eq. 8 and 12 at entropy ``h``: (c_sft exp(s h), c_rl exp(h))."""
    return cfg.c_sft * math.exp(cfg.sft_entropy_sign * h), cfg.c_rl * math.exp(h)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def target_range(cfg) -> tuple:
    """[lo, hi] of ``target``'s h_eff: where c_rl exp(h_eff) is within the weight bounds."""
    lo = math.log(cfg.weight_min / cfg.c_rl) if cfg.weight_min > 0 else -math.inf
    return lo, math.log(cfg.weight_max / cfg.c_rl)


def schedule_step(state: dict, entropy: float, cfg) -> tuple:
    """One step of ``cfg.weight_schedule`` (cfg: an AlgorithmConfig): returns
    (:class:`StepWeights` or None for ``exp``, the new state). ``state`` is not modified."""
    name = cfg.weight_schedule
    if name not in SCHEDULES:
        raise ValueError(f"algorithm.weight_schedule must be one of {SCHEDULES}, got {name!r}")
    if name == "exp":
        return None, {}
    if name == "fixed":
        return StepWeights(cfg.fixed_weight, cfg.fixed_weight), {"schedule": name}
    prev = state if state.get("schedule") == name else {}
    h = float(entropy)
    if name == "ema":
        h_ema = ema_update(prev.get("h_ema"), h, decay(cfg.entropy_ema_halflife))
        w_sft, w_rl = paper_weights(h_ema, cfg)
        return StepWeights(w_sft, w_rl, h_ema), {"schedule": name, "h_ema": h_ema}
    lo_w, hi_w = cfg.weight_min, cfg.weight_max
    if name == "ema2":
        fast = ema_update(prev.get("h_fast"), h, decay(cfg.entropy_ema_halflife))
        slow = ema_update(prev.get("h_slow"), h, decay(cfg.entropy_ema_slow_halflife))
        h_eff = slow + cfg.entropy_trend_gain * (fast - slow)
        w_sft, w_rl = paper_weights(h_eff, cfg)
        return (StepWeights(_clamp(w_sft, lo_w, hi_w), _clamp(w_rl, lo_w, hi_w), h_eff),
                {"schedule": name, "h_fast": fast, "h_slow": slow})
    # target (null target_entropy: the first step's entropy, kept in the state)
    target = cfg.target_entropy if cfg.target_entropy is not None else prev.get("target", h)
    if not math.isfinite(target):  # no entropy yet to hold: the paper's weights at it later
        return StepWeights(*paper_weights(h, cfg), h), {}
    lo, hi = target_range(cfg)
    h_eff = prev.get("h_eff", _clamp(target, lo, hi))
    if math.isfinite(h):
        h_eff = _clamp(h_eff + cfg.target_gain * (h - target), lo, hi)
    w_sft, w_rl = paper_weights(h_eff, cfg)
    state = {"schedule": name, "h_eff": h_eff}
    if cfg.target_entropy is None:
        state["target"] = target
    return (StepWeights(_clamp(w_sft, lo_w, hi_w), _clamp(w_rl, lo_w, hi_w), h_eff), state)


def schedule_metrics(weights: Optional[StepWeights], state: dict) -> dict:
    """``schedule/w_sft``, ``schedule/w_rl``, ``schedule/h_eff`` and the state's averages
    (``schedule/h_ema``, ``schedule/h_fast``, ``schedule/h_slow``); nothing for ``exp``."""
    if weights is None:
        return {}
    out = {"schedule/w_sft": weights.w_sft, "schedule/w_rl": weights.w_rl}
    if weights.h_eff is not None:
        out["schedule/h_eff"] = weights.h_eff
    out.update({f"schedule/{k}": v for k, v in state.items() if k not in ("schedule", "h_eff")})
    return out
