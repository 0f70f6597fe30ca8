"""Scoring of responses: math answers through math-verify, option letters for multiple
choice, and the avg@k / pass@1 arithmetic."""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

from srft_mcore.evaluation.records import LETTERS, EvalItem


def _after_think(text: str) -> str:
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def _main_thread_timeout(seconds: int) -> Optional[int]:
    import threading

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    return seconds if threading.current_thread() is threading.main_thread() else None


def _verify_unboxed(text: str, gold: str) -> tuple[float, Optional[str]]:
    """math-verify's own extraction (LaTeX, then plain expressions) of a response without a box."""
    from math_verify import parse, verify

    timeout = _main_thread_timeout(3)
    pred = parse(text, parsing_timeout=timeout)
    if not pred:
        return 0.0, None
    extracted = str(pred[-1])
    target = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    if not target:
        return 0.0, extracted
    return (1.0 if verify(target, pred, timeout_seconds=timeout) else 0.0), extracted


def math_score(response: str, answer: str) -> tuple[float, Optional[str]]:
    """(score, extracted answer) of a math response: its last ``\\boxed{}`` checked by the
    project's math reward, else math-verify's extraction from the text after ``</think>``.
    Never raises (a parse failure or timeout scores 0)."""
    from srft_mcore.reward import extract_boxed, math_reward

    boxed = extract_boxed(response)
    if boxed is not None:
        return math_reward(response, answer), boxed
    gold = extract_boxed(str(answer)) or str(answer)
    try:
        return _verify_unboxed(_after_think(response), gold)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - math-verify's timeout is a BaseException
        return 0.0, None


_ANSWER_LETTER = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*(?:(?i:option)\s*)?"
                            r"[\(\[*]*\s*([A-Z])(?![A-Za-z0-9])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9\\])([A-Z])(?![A-Za-z0-9])")


def extract_choice(response: str, n_options: int) -> Optional[str]:
    """The option letter a response gives: a boxed letter, else the last ``Answer: X`` /
    ``answer is (X)``, else the last standalone capital letter among the options' letters
    (in the text after ``</think>``). None when there is none."""
    from srft_mcore.reward import extract_boxed

    valid = LETTERS[:n_options]
    tail = _after_think(response)
    boxed = extract_boxed(tail) or extract_boxed(response)
    if boxed is not None:
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", boxed)
        m = re.match(r"[\s($]*([A-Z])(?![A-Za-z0-9])", inner)
        if m and m.group(1) in valid:
            return m.group(1)
    for pattern in (_ANSWER_LETTER, _STANDALONE_LETTER):
        found = [m.group(1) for m in pattern.finditer(tail) if m.group(1) in valid]
        if found:
            return found[-1]
    return None


def score_item(item: EvalItem, response: str,
               reward_fn: Optional[Callable] = None) -> tuple[float, Optional[str]]:
    """(score, extracted answer). Multiple choice: 1.0 when the extracted letter is the correct
    option's. Math: :func:`math_score`, or ``reward_fn(response, answer, question)`` when
    given (a training reward; its extracted answer is the last box)."""
    if item.choices is not None:
        letter = extract_choice(response, len(item.choices))
        return (1.0 if letter == item.answer else 0.0), letter
    if reward_fn is None:
        return math_score(response, item.answer)
    from srft_mcore.reward import extract_boxed, score_batch

    score = score_batch(reward_fn, [response], [item.answer], [item.question])[0]
    return score, extract_boxed(response)


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
