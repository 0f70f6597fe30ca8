"""Scoring of responses with the strict rules the training reward uses too: math answers
through math-verify (:func:`~srft_mcore.reward.math_answer.strict_math_score`), option
letters for multiple choice, and the avg@k / pass@1 arithmetic.

Every score comes with the rule that decided it (a row's ``rule``): ``truncated`` (stopped at
the length limit: 0), ``boxed``, ``after_think``, ``no_answer`` for math; ``choice_boxed``,
``choice_cue``, ``choice_letter``, ``no_answer`` for multiple choice; ``reward`` when a
training reward function scored it (``--reward``).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

from srft_mcore.evaluation.records import LETTERS, EvalItem
from srft_mcore.reward.math_answer import Scored, extract_boxed, is_truncated, strict_math_score


def _after_think(text: str) -> str:
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def math_score(response: str, answer: str,
               finish_reason: Optional[str] = None) -> tuple[float, Optional[str]]:
    """(score, extracted answer) of a math response under the strict rules. Never raises."""
    score, extracted, _ = strict_math_score(response, answer, finish_reason)
    return score, extracted


# A cue names the answer explicitly: "Answer: c", "the answer is (B)", "option is D",
# "choice is **A**"; only after one may the letter be lowercase.
_CUE = re.compile(r"(?i:\b(?:answer|option|choice))(?:\s+(?i:is)\b\s*:?|\s*[:\-])\s*"
                  r"(?:(?i:option|choice)\s+)?[\(\[*_\s]*([A-Za-z])(?![A-Za-z0-9'’])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9\\])([A-Z])(?![A-Za-z0-9'’])")
_WORD_AFTER = re.compile(r"\s+[a-z]")


def _is_word(text: str, m: re.Match) -> bool:
    """"A careful", "I believe", "a bit": the article or pronoun, not an option."""
    return m.group(1) in "AaIi" and _WORD_AFTER.match(text, m.end(1)) is not None


def _letters(pattern: re.Pattern, text: str, valid: str) -> list:
    return [m.group(1).upper() for m in pattern.finditer(text)
            if m.group(1).upper() in valid and not _is_word(text, m)]


def choice_letter(response: str, n_options: int) -> tuple[Optional[str], str]:
    """(option letter, rule) of a multiple-choice response, in the text after ``</think>``
    (the whole text without one): a boxed letter (``choice_boxed``), else the last cue
    ``Answer: X`` / ``answer is (X)`` / ``option is X`` / ``choice is X`` (``choice_cue``,
    the letter in either case), else the last standalone capital letter (``choice_letter``).
    Only the options' letters count, and a capital A or I followed by a lowercase word is a
    word. (None, ``no_answer``) when there is none."""
    valid = LETTERS[:n_options]
    if not isinstance(response, str):
        return None, "no_answer"
    tail = _after_think(response)
    boxed = extract_boxed(tail) or extract_boxed(response)
    if boxed is not None:
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", boxed)
        m = re.match(r"[\s($]*([A-Za-z])(?![A-Za-z0-9])", inner)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper(), "choice_boxed"
    for pattern, rule in ((_CUE, "choice_cue"), (_STANDALONE_LETTER, "choice_letter")):
        found = _letters(pattern, tail, valid)
        if found:
            return found[-1], rule
    return None, "no_answer"


def extract_choice(response: str, n_options: int) -> Optional[str]:
    """The option letter a response gives (:func:`choice_letter`), or None."""
    return choice_letter(response, n_options)[0]


def score_response(item: EvalItem, response: str, finish_reason: Optional[str] = None,
                   reward_fn: Optional[Callable] = None) -> Scored:
    """``Scored(score, extracted, rule)`` of one generation: 0 under ``truncated`` when it
    stopped at the length limit; multiple choice: 1.0 when the extracted letter is the
    correct option's; math: :func:`strict_math_score`, or ``reward_fn(response, answer,
    question)`` when given (a training reward, rule ``reward``; its extracted answer is the
    last box)."""
    if item.choices is not None:
        letter, rule = choice_letter(response, len(item.choices))
        if is_truncated(finish_reason):
            return Scored(0.0, letter, "truncated")
        return Scored(1.0 if letter == item.answer else 0.0, letter, rule)
    if reward_fn is None:
        return strict_math_score(response, item.answer, finish_reason)
    from srft_mcore.reward import score_batch

    if is_truncated(finish_reason):
        return Scored(0.0, extract_boxed(response), "truncated")
    score = score_batch(reward_fn, [response], [item.answer], [item.question])[0]
    return Scored(score, extract_boxed(response), "reward")


def score_item(item: EvalItem, response: str, reward_fn: Optional[Callable] = None,
               finish_reason: Optional[str] = None) -> tuple[float, Optional[str]]:
    """(score, extracted answer) of :func:`score_response`."""
    score, extracted, _ = score_response(item, response, finish_reason, reward_fn)
    return score, extracted


def sample_accuracy(correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(avg@k, std over the k samples): the accuracy of each sample index j over the
    problems, averaged over j. With k = 1 this is pass@1."""
    if not correct:
        return 0.0, 0.0
    k = len(correct[0])
    if k == 0 or any(len(c) != k for c in correct):
        raise ValueError(f"every problem needs the same number of samples, got "
                         f"{sorted({len(c) for c in correct})}")
    per_sample = [sum(bool(c[j]) for c in correct) / len(correct) for j in range(k)]
    mean = sum(per_sample) / k
    std = math.sqrt(sum((a - mean) ** 2 for a in per_sample) / k)
    return mean, std


def metric_name(n_samples: int) -> str:
    return "pass@1" if n_samples == 1 else f"avg@{n_samples}"
