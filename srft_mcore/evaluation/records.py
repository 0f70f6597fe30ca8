"""Benchmark files as evaluation sets: field detection for the math and multiple-choice
layouts, reference answers as text, the correct option and its seeded shuffle."""
from __future__ import annotations

import os
import random
import re
import string
from dataclasses import dataclass, field
from typing import Optional, Sequence

from srft_mcore.evaluation.errors import EvalError

PROMPT_KEYS = ("problem", "question", "prompt", "input", "query")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "ground_truth", "target", "solution")
OPTION_KEYS = ("options", "choices")
CHOICE_ANSWER_KEYS = ("answer", "answerkey", "answer_key", "answer_index", "answer_idx",
                      "label", "correct_answer", "gold", "target")
ID_KEYS = ("unique_id", "id", "idx", "problem_id", "question_id")
GPQA_CORRECT = "correct_answer"
GPQA_INCORRECT = re.compile(r"^incorrect_answer_?\d+$")
LETTERS = string.ascii_uppercase
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass
class EvalItem:
    """One problem as the model sees it."""

    index: int
    """Position of the record in its file."""
    id: Optional[str]
    """The record's own id (``unique_id``, ``id``, ...) when it has one."""
    question: str
    """The problem or question text as in the file."""
    prompt: str
    """What the template wraps: the question, plus the lettered options for multiple choice."""
    answer: str
    """Gold answer: the reference answer, or the correct option's letter."""
    choices: Optional[list] = None
    """Multiple choice: the options in the order shown (A, B, ...)."""


@dataclass
class EvalSet:
    name: str
    path: str
    kind: str
    """``math`` or ``choice``."""
    fields: dict
    """Which file fields were used (prompt, answer, options, id)."""
    items: list


@dataclass
class _Layout:
    kind: str
    prompt: str
    answer: Optional[str] = None
    options: Optional[str] = None
    incorrect: list = field(default_factory=list)
    id: Optional[str] = None


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _find(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    by_norm = {}
    for c in columns:
        by_norm.setdefault(_norm(c), c)
    return next((by_norm[c] for c in candidates if c in by_norm), None)


def _given(columns: Sequence[str], key: Optional[str], option: str, path: str) -> Optional[str]:
    if key is None:
        return None
    if key in columns:
        return key
    found = _find(columns, [_norm(key)])
    if found is None:
        raise EvalError(f"{path}: no field {key!r} ({option}); the records have fields "
                        f"{list(columns)}. Fix: set {option} to one of them")
    return found


def detect_layout(columns: Sequence[str], path: str, prompt_key: Optional[str] = None,
                  answer_key: Optional[str] = None,
                  options_key: Optional[str] = None) -> _Layout:
    """Which fields hold the problem, the answer and (multiple choice) the options.

    Raises EvalError listing the fields found and the ones expected when they cannot be told.
    """
    columns = list(columns)
    prompt = _given(columns, prompt_key, "--prompt-key", path) or _find(columns, PROMPT_KEYS)
    options = _given(columns, options_key, "--options-key", path) or _find(columns, OPTION_KEYS)
    by_norm = {_norm(c): c for c in columns}
    incorrect = sorted((c for n, c in by_norm.items() if GPQA_INCORRECT.match(n)), key=_norm)
    gpqa = options is None and GPQA_CORRECT in by_norm and bool(incorrect)
    if gpqa:
        answer = _given(columns, answer_key, "--answer-key", path) or by_norm[GPQA_CORRECT]
        kind = "choice"
    elif options is not None:
        answer = (_given(columns, answer_key, "--answer-key", path)
                  or _find(columns, CHOICE_ANSWER_KEYS))
        kind = "choice"
    else:
        answer = _given(columns, answer_key, "--answer-key", path) or _find(columns, ANSWER_KEYS)
        kind = "math"
    if prompt is None or answer is None:
        missing = " and ".join(w for w, v in (("problem", prompt), ("answer", answer))
                               if v is None)
        raise EvalError(
            f"{path}: cannot tell which fields hold the {missing}: the records have fields "
            f"{columns}. Expected a problem field (one of {', '.join(PROMPT_KEYS)}) and an "
            f"answer field (one of {', '.join(ANSWER_KEYS)}); for multiple choice also an "
            f"options field (one of {', '.join(OPTION_KEYS)}) with the answer as a letter, "
            f"index or option text (one of {', '.join(CHOICE_ANSWER_KEYS)}), or GPQA's "
            f"'Correct Answer' + 'Incorrect Answer 1..3' columns. Fix: name the fields with "
            f"--prompt-key and --answer-key (and --options-key for multiple choice)")
    return _Layout(kind=kind, prompt=prompt, answer=answer, options=options,
                   incorrect=incorrect if gpqa else [], id=_find(columns, ID_KEYS))


def answer_text(value) -> str:
    """A reference answer as text: integral floats without ``.0`` (AMC), lists joined
    (OlympiadBench's ``final_answer``), surrounding ``$`` removed."""
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if len(text) > 1 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def _text(value, key: str, index: int, option: str, path: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise EvalError(f"{path}: record {index} has no {key!r}. Fix: drop or complete that "
                        f"record, or choose another field with {option}")
    if isinstance(value, (dict, list, tuple)) and option == "--prompt-key":
        raise EvalError(f"{path}: field {key!r} of record {index} is a "
                        f"{type(value).__name__}, not text. Fix: choose a text field with "
                        f"{option}")
    return answer_text(value)


def _options(value, index: int, key: str, path: str) -> tuple[list, Optional[list]]:
    """(option texts, labels or None) from a list, or an ARC-style {"text", "label"} dict."""
    labels = None
    if isinstance(value, dict) and "text" in value:
        labels = [str(v).strip() for v in value.get("label") or []] or None
        value = value["text"]
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise EvalError(f"{path}: field {key!r} of record {index} is {str(value)[:80]!r}, not "
                        f"a list of at least 2 options. Fix: point --options-key at a list of "
                        f"option texts")
    if len(value) > len(LETTERS):
        raise EvalError(f"{path}: record {index} has {len(value)} options; at most "
                        f"{len(LETTERS)} can be lettered. Fix: drop that record")
    return [str(v).strip() for v in value], labels


def gold_index(answer, options: list, labels: Optional[list] = None) -> Optional[int]:
    """Index of the correct option: ``answer`` is a label (ARC ``answerKey``), a letter, a
    0-based index (int or digits, as MMLU and MMLU-Pro's ``answer_index``) or the option's
    text. None when it is none of these."""
    if isinstance(answer, bool) or answer is None:
        return None
    text = str(answer).strip()
    if labels and text in labels:
        return labels.index(text)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, int):
        return answer if 0 <= answer < len(options) else None
    if text in options:
        return options.index(text)
    letter = text.strip("().: ")
    if len(letter) == 1 and letter in LETTERS[:len(options)]:
        return LETTERS.index(letter)
    if text.isdigit() and int(text) < len(options):
        return int(text)
    return None


def shuffle_options(options: list, gold: int, seed: int, index: int) -> tuple[list, int]:
    """(options in a seeded random order, the gold option's new position). The order is a
    pure function of (seed, index): the same in every process and Python run."""
    order = list(range(len(options)))
    random.Random(f"srft-eval:{seed}:{index}").shuffle(order)
    return [options[i] for i in order], order.index(gold)


def choice_prompt(question: str, options: list) -> str:
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"


def _choice_item(row: dict, i: int, layout: _Layout, path: str, shuffle: bool,
                 seed: int) -> EvalItem:
    question = _text(row.get(layout.prompt), layout.prompt, i, "--prompt-key", path)
    if layout.incorrect:  # GPQA: the correct answer plus the incorrect ones
        options = [_text(row.get(layout.answer), layout.answer, i, "--answer-key", path)]
        options += [_text(row.get(k), k, i, "--options-key", path) for k in layout.incorrect]
        labels, gold = None, 0
    else:
        options, labels = _options(row.get(layout.options), i, layout.options, path)
        gold = gold_index(row.get(layout.answer), options, labels)
        if gold is None:
            raise EvalError(
                f"{path}: record {i}: answer {row.get(layout.answer)!r} (field "
                f"{layout.answer!r}) is not a letter, 0-based index, label or text of one of "
                f"its {len(options)} options. Fix: correct that record or choose the answer "
                f"field with --answer-key")
    if shuffle:
        options, gold = shuffle_options(options, gold, seed, i)
    return EvalItem(index=i, id=_item_id(row, layout), question=question,
                    prompt=choice_prompt(question, options), answer=LETTERS[gold],
                    choices=options)


def _item_id(row: dict, layout: _Layout) -> Optional[str]:
    value = row.get(layout.id) if layout.id else None
    return None if value is None else str(value)


def _math_item(row: dict, i: int, layout: _Layout, path: str) -> EvalItem:
    question = _text(row.get(layout.prompt), layout.prompt, i, "--prompt-key", path)
    answer = _text(row.get(layout.answer), layout.answer, i, "--answer-key", path)
    return EvalItem(index=i, id=_item_id(row, layout), question=question, prompt=question,
                    answer=answer)


def _read_rows(path: str) -> tuple[list, list]:
    from srft_mcore.data.loading import _read

    if not os.path.exists(path):
        raise EvalError(f"--data {path}: no such file. Fix: give a local .jsonl/.json/.parquet/"
                        f".arrow file or a datasets save_to_disk directory")
    if os.path.isfile(path) and not path.lower().endswith(DATA_SUFFIXES):
        raise EvalError(f"--data {path}: unknown format (expected one of "
                        f"{', '.join(DATA_SUFFIXES)}). Fix: convert it to jsonl or parquet")
    ds = _read(path)
    if len(ds) == 0:
        raise EvalError(f"--data {path}: the file holds no records. Fix: give a non-empty file")
    return list(ds.column_names), ds.to_list()


def load_eval_set(path: str, name: Optional[str] = None, prompt_key: Optional[str] = None,
                  answer_key: Optional[str] = None, options_key: Optional[str] = None,
                  shuffle: bool = True, seed: int = 0, limit: Optional[int] = None) -> EvalSet:
    """Read and check a benchmark file; every record is validated here, before any server.

    ``seed`` seeds the per-item option shuffle of multiple-choice sets; ``limit`` keeps the
    first records only.
    """
    columns, rows = _read_rows(path)
    layout = detect_layout(columns, path, prompt_key, answer_key, options_key)
    if limit is not None:
        rows = rows[:limit]
    if layout.kind == "choice":
        items = [_choice_item(r, i, layout, path, shuffle, seed) for i, r in enumerate(rows)]
    else:
        items = [_math_item(r, i, layout, path) for i, r in enumerate(rows)]
    fields = {"prompt": layout.prompt, "answer": layout.answer}
    if layout.options or layout.incorrect:
        fields["options"] = layout.options or layout.incorrect
    if layout.id:
        fields["id"] = layout.id
    return EvalSet(name=name or split_name(path), path=os.path.abspath(path), kind=layout.kind,
                   fields=fields, items=items)


def check_unshuffled(evalset: EvalSet) -> None:
    """Refuse a multiple-choice set kept in file order whose correct option sits at the same
    position in every item (GPQA's files put it first): a model that always names that
    letter would score 100%, and a position bias would read as accuracy."""
    if evalset.kind != "choice" or len(evalset.items) < 2:
        return
    golds = {it.answer for it in evalset.items}
    if len(golds) == 1:
        letter = golds.pop()
        raise EvalError(
            f"{evalset.path}: --no-shuffle keeps the options in file order, and there the "
            f"correct option is {letter} in all {len(evalset.items)} items: answering "
            f"{letter} every time would score 100%. Fix: drop --no-shuffle (the options are "
            f"then shuffled per item with a seeded RNG, --seed)")


def split_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in DATA_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base
