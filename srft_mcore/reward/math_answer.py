"""Binary math reward: the last ``\\boxed{...}`` of a response checked against the answer.

The paper scores a rollout 1 when its final answer verifies with math-verify, else 0
(arXiv 2506.19767, section 4). A reward function never raises: malformed LaTeX, a missing
box or a sympy timeout all score 0.0, so one odd rollout cannot stop a training step.

:func:`strict_math_score` holds the strict rules shared by the training reward and every
evaluation, and names the rule that decided each score:

- ``truncated``: the response stopped at the length limit (``finish_reason == "length"``):
  0, whatever the text holds (the last number of cut-off reasoning is not an answer);
- ``boxed``: the last complete ``\\boxed{}`` checked against the answer;
- ``after_think`` (not for the training reward, which wants a box): no box, and math-verify
  extracts an answer from the final-answer part: the non-empty text after the last
  ``</think>``, or the whole response when it has no think block at all;
- ``no_answer``: nothing of the above: no box, and a ``<think>`` never closed, nothing after
  ``</think>`` or nothing usable there.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import NamedTuple, Optional

log = logging.getLogger(__name__)

_BOX_OPENERS = ("\\boxed", "\\fbox")
_TIMEOUT_S = 3


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``\\boxed 5`` (no braces, a single token) is accepted too. Returns None when there is no
    complete box.
    """
    if not isinstance(text, str):
        return None
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    for start in reversed(starts):
        content = _box_content(text, start)
        if content is not None:
            return content
    return None


def _box_content(text: str, start: int) -> Optional[str]:
    i = start + 1
    while i < len(text) and text[i].isalpha():
        i += 1
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # "\boxed 5": one whitespace-delimited token
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
            continue
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def normalize_answer(text: str) -> str:
    """Cheap canonical form for the exact-match fast path (whitespace, $, trailing dot)."""
    s = text.strip().strip("$").strip()
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    for cmd in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ "):
        s = s.replace(cmd, "")
    if s.startswith("\\text{") and s.endswith("}"):
        s = s[len("\\text{"):-1]
    return s


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def math_reward(response: str, answer: str, prompt: Optional[str] = None) -> float:
    """1.0 when the last boxed answer of ``response`` equals ``answer`` mathematically.

    ``answer`` may itself contain a ``\\boxed{}`` (then its content is the gold). Exact
    string match after :func:`normalize_answer` is the fast path; otherwise math-verify
    decides (fractions vs decimals, LaTeX forms, ...). No box scores 0 (the training
    reward does not look for unboxed answers). Never raises. A rollout cut off by the
    length limit scores 0 in training whatever this returns (``score_batch``).
    """
    return strict_math_score(response, answer, boxed_only=True).score


TRUNCATED = "length"
"""The finish reason of a response cut off by the token limit: it always scores 0."""


def is_truncated(finish_reason: Optional[str]) -> bool:
    return finish_reason == TRUNCATED


class Scored(NamedTuple):
    """One response's score, the answer taken from it, and the rule that decided."""

    score: float
    extracted: Optional[str]
    rule: str


def final_text(response: str) -> Optional[str]:
    """The final-answer part of a response, stripped: the text after the last ``</think>``;
    the whole response when it has no think block at all (a model that answers directly);
    None when a ``<think>`` was never closed or nothing follows ``</think>`` (the reasoning
    never reached a final answer: its last number is not an answer)."""
    if not isinstance(response, str):
        return None
    if "</think>" not in response:
        return None if "<think>" in response else (response.strip() or None)
    tail = response.rsplit("</think>", 1)[1].strip()
    return tail or None


def _gold(answer) -> str:
    gold = str(answer)
    return extract_boxed(gold) or gold


def _check_box(pred: str, answer) -> float:
    gold = _gold(answer)
    if normalize_answer(pred) == normalize_answer(gold):
        return 1.0
    if not normalize_answer(pred) or not normalize_answer(gold):
        return 0.0
    return 1.0 if _verify(gold, pred) else 0.0


def _verify_text(text: str, answer) -> tuple[float, Optional[str]]:
    """math-verify's own extraction (LaTeX, then plain expressions) from unboxed text."""
    from math_verify import parse, verify

    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    pred = parse(text, parsing_timeout=timeout)
    if not pred:
        return 0.0, None
    extracted = str(pred[-1])
    target = parse(f"\\boxed{{{_gold(answer)}}}", parsing_timeout=timeout)
    if not target:
        return 0.0, extracted
    return (1.0 if verify(target, pred, timeout_seconds=timeout) else 0.0), extracted


def strict_math_score(response: str, answer, finish_reason: Optional[str] = None,
                      boxed_only: bool = False) -> Scored:
    """The strict math rules (module docstring): ``Scored(score, extracted, rule)``.

    ``boxed_only`` (the training reward) skips the ``after_think`` rule. Never raises: a
    parse failure or timeout scores 0 under the rule that was being applied.
    """
    try:
        boxed = extract_boxed(response)
        if is_truncated(finish_reason):
            return Scored(0.0, boxed, "truncated")
        if answer is None:
            return Scored(0.0, boxed, "boxed" if boxed is not None else "no_answer")
        if boxed is not None:
            return Scored(_safe(_check_box, boxed, answer), boxed, "boxed")
        tail = None if boxed_only else final_text(response)
        if tail is None:
            return Scored(0.0, None, "no_answer")
        found = _safe(_verify_text, tail, answer, default=(0.0, None))
        if found[1] is None:
            return Scored(0.0, None, "no_answer")
        return Scored(found[0], found[1], "after_think")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see _safe
        log.debug("strict_math_score: %s: %s", type(e).__name__, e)
        return Scored(0.0, None, "no_answer")


def _safe(fn, *args, default=0.0):
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - math-verify's timeout is a BaseException
        log.debug("math scoring: verification failed (%s: %s)", type(e).__name__, e)
        return default
