"""Binary math reward: the last ``\\boxed{...}`` of a response checked against the answer.

The paper scores a rollout 1 when its final answer verifies with math-verify, else 0
(arXiv 2506.19767, section 4). A reward function never raises: malformed LaTeX, a missing
box or a sympy timeout all score 0.0, so one odd rollout cannot stop a training step.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Optional

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
    decides (fractions vs decimals, LaTeX forms, ...). Never raises.
    """
    try:
        pred = extract_boxed(response)
        if pred is None or answer is None:
            return 0.0
        gold = str(answer)
        gold = extract_boxed(gold) or gold
        if normalize_answer(pred) == normalize_answer(gold):
            return 1.0
        if not normalize_answer(pred) or not normalize_answer(gold):
            return 0.0
        return 1.0 if _verify(gold, pred) else 0.0
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - math-verify's timeout is a BaseException
        log.debug("math_reward: verification failed (%s: %s)", type(e).__name__, e)
        return 0.0
