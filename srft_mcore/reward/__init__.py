"""Rewards: a registry of named reward functions plus ``module:function`` loading.

A reward function has the signature ``fn(response_text, answer, prompt) -> float``. It does
not see the finish reason: a rollout cut off by the length limit (``finish_reason ==
"length"``) scores 0 whatever the function would return (:func:`score_batch`), as in every
evaluation (:func:`~srft_mcore.reward.math_answer.strict_math_score`).

Training scores in worker processes, each answer within a time limit
(:class:`~srft_mcore.reward.pool.RewardPool`, ``reward.workers`` / ``reward.timeout_s``);
:func:`score_batch` is the same scoring in this process, without a limit.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Sequence

from .math_answer import (TRUNCATED, Scored, extract_boxed, final_text, is_truncated,
                          math_reward, normalize_answer, strict_math_score)

RewardFn = Callable[[str, str, Optional[str]], float]

REWARDS: dict[str, RewardFn] = {"math": math_reward}
"""Named rewards; ``reward.fn`` may name one of these or a ``module:function``."""

__all__ = ["REWARDS", "RewardError", "RewardFn", "Scored", "TRUNCATED", "check_batch",
           "extract_boxed", "final_text", "get_reward_fn", "is_truncated", "math_reward",
           "normalize_answer", "register_reward", "score_batch", "score_one",
           "strict_math_score"]


class RewardError(ValueError):
    """A reward function cannot be loaded, or returned something that is not a number."""


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    if name in REWARDS and REWARDS[name] is not fn:
        raise RewardError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn


def get_reward_fn(spec: Optional[str] = "math") -> RewardFn:
    """Resolve ``spec``: a registered name (``math``) or ``package.module:function``.

    None means ``math``. Raises RewardError naming the spec and what went wrong.
    """
    if spec is None:
        spec = "math"
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"reward.fn={spec!r}: expected a registered name "
                          f"({', '.join(sorted(REWARDS))}) or 'module:function'")
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise RewardError(f"reward.fn={spec!r}: not a registered reward "
                          f"({', '.join(sorted(REWARDS))}) and not of the form "
                          f"'module:function' (e.g. my_rewards:exact_match)")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RewardError(f"reward.fn={spec!r}: cannot import module {module_name!r} "
                          f"({type(e).__name__}: {e}). Fix: make it importable (on PYTHONPATH "
                          f"or installed) or use a registered reward "
                          f"({', '.join(sorted(REWARDS))})") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardError(f"reward.fn={spec!r}: module {module_name!r} has no attribute "
                              f"{attr!r}")
    if not callable(fn):
        raise RewardError(f"reward.fn={spec!r}: {attr!r} is a {type(fn).__name__}, "
                          f"not a callable fn(response, answer, prompt) -> float")
    return fn


def check_batch(responses: Sequence[str], answers: Sequence[str],
                prompts: Optional[Sequence[Optional[str]]] = None,
                finish_reasons: Optional[Sequence[Optional[str]]] = None) -> tuple:
    """``(prompts, finish_reasons)`` as lists of ``len(responses)`` (None fills a missing
    one); RewardError when the lengths disagree."""
    if len(responses) != len(answers):
        raise RewardError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
    if prompts is None:
        prompts = [None] * len(responses)
    elif len(prompts) != len(responses):
        raise RewardError(f"score_batch: {len(responses)} responses but {len(prompts)} prompts")
    if finish_reasons is None:
        finish_reasons = [None] * len(responses)
    elif len(finish_reasons) != len(responses):
        raise RewardError(f"score_batch: {len(responses)} responses but {len(finish_reasons)} "
                          f"finish reasons")
    return list(prompts), list(finish_reasons)


def fn_name(fn: RewardFn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def score_one(fn: RewardFn, i: int, response: str, answer: str,
              prompt: Optional[str] = None) -> float:
    """``fn``'s score of sample ``i`` as a finite float; RewardError naming the sample when
    ``fn`` raises or returns something else (the same check in-process and in a worker)."""
    name = fn_name(fn)
    try:
        value = fn(response, answer, prompt)
    except Exception as e:
        raise RewardError(f"reward function {name} raised on sample {i} "
                          f"({type(e).__name__}: {e})") from e
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise RewardError(f"reward function {name} returned {value!r} for sample {i}; "
                          f"expected a float") from None
    if not math.isfinite(value):
        raise RewardError(f"reward function {name} returned {value} for sample {i}; "
                          f"expected a finite float")
    return value


def score_batch(fn: RewardFn, responses: Sequence[str], answers: Sequence[str],
                prompts: Optional[Sequence[Optional[str]]] = None,
                finish_reasons: Optional[Sequence[Optional[str]]] = None) -> list[float]:
    """Score ``responses[i]`` against ``answers[i]``; one float per response, in this process
    (no timeout: :class:`~srft_mcore.reward.pool.RewardPool` scores in worker processes and
    gives up on an answer after ``timeout_s``).

    With ``finish_reasons``, a response cut off by the length limit scores 0.0 without
    calling ``fn``: its text holds no final answer, only where the reasoning stopped.

    A user function that raises or returns a non-number fails loudly with the sample index
    (a silent 0 would hide a bug in the reward as a flat learning curve).
    """
    prompts, finish_reasons = check_batch(responses, answers, prompts, finish_reasons)
    return [0.0 if is_truncated(finish) else score_one(fn, i, resp, ans, prompt)
            for i, (resp, ans, prompt, finish) in enumerate(zip(responses, answers, prompts,
                                                                finish_reasons))]
