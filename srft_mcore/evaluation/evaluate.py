"""Benchmark evaluation through SGLang + math-verify: ``srft-eval`` and evaluation in training.

  srft-eval --model DIR --data [NAME=]FILE [--data ...] [--out DIR] [options]
  srft-eval --url http://HOST:PORT --hf-config DIR --data FILE ...

``--model`` takes a HF model directory, a trainer checkpoint (``RUN/checkpoints/step_XXXXXX``,
or a run directory: its ``hf_final``, else its latest checkpoint) or an ``srft-convert
hf-to-mcore`` output; Megatron checkpoints are converted to a temporary HF directory with the
project's converter first. The model is served by one SGLang server (the CPU recipe without
CUDA) unless ``--url`` attaches to running ones.

Files (jsonl / json / parquet / arrow, or a ``save_to_disk`` directory) are read in two layouts,
the field names detected case-insensitively or given with ``--prompt-key/--answer-key/
--options-key``:

- math (MATH-500, AIME24, AMC, Minerva, OlympiadBench): a problem field (``problem``,
  ``question``, ...) and an answer field (``answer``, ``final_answer``, ...). A response is
  scored on its last ``\\boxed{}`` with the project's math reward (math-verify); a response
  without a box is scored on what math-verify's own extraction finds after ``</think>``.
- multiple choice (ARC-C, GPQA-Diamond, MMLU-Pro): a question, an options list (``options``,
  ``choices``, or GPQA's ``Correct Answer`` + ``Incorrect Answer N`` columns) and the correct
  option as a letter, a 0-based index, a label or the option's text. The options are shuffled
  with a RNG seeded per item, shown as ``A. ...``; the letter is taken from the response (a
  boxed letter, ``Answer: X``, else the last standalone letter) and checked against the
  correct option's shuffled position.

Decoding follows arXiv 2506.19767's evaluation: temperature 0.6, up to 8192 new tokens (capped
by the served context), ``--n-samples k`` samples per problem: pass@1 for k = 1, avg@k (the
mean over the k samples of the accuracy) otherwise. ``--seed`` makes sampling reproducible
(rollout/seeded.py). The prompt template is the training run's (``data.template`` in the run's
``config.yaml``) when the model comes from a run, else ``think`` (the paper's prompt).

Output in ``--out``: ``results.md`` (one row per file), ``results.json``, and
``generations/NAME.jsonl`` (every sample with its extracted answer and score). The last line
printed is one JSON object: ``{"results": {NAME: {"acc", "n", "metric", ...}}, ...}``.

In training, :func:`evaluate_splits` scores splits with the same code through the trainer's
live servers (an :class:`~srft_mcore.rollout.client.SGLangClient`), returning
``{"eval/NAME/acc": float}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import string
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

PAPER_TEMPERATURE = 0.6
PAPER_MAX_NEW_TOKENS = 8192
DEFAULT_TEMPLATE = "think"
CONTEXT_MARGIN = 2
"""Tokens kept free below the served context length (SGLang keeps a request below it)."""

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


class EvalError(ValueError):
    """Bad input to the evaluation (model, data, options); the message ends with the fix."""


# --------------------------------------------------------------------------- data
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


def split_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in DATA_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


# --------------------------------------------------------------------------- scoring
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


# --------------------------------------------------------------------------- generation
def paper_sampling(seed: Optional[int] = None, max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
                   temperature: float = PAPER_TEMPERATURE):
    """The paper's evaluation decoding (temperature 0.6, 8192 new tokens, no top-p)."""
    from srft_mcore.rollout.client import SamplingParams

    return SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                          seed=seed)


def server_context_length(url: str, timeout_s: float = 30.0) -> Optional[int]:
    """The context length a SGLang server serves (its OpenAI ``/v1/models``), or None."""
    import requests

    try:
        r = requests.get(url.rstrip("/") + "/v1/models", timeout=timeout_s)
        r.raise_for_status()
        value = r.json()["data"][0].get("max_model_len")
        return int(value) if value else None
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
        return None


def prompt_ids(items: Sequence[EvalItem], tokenizer, template: str) -> list:
    """Token ids of the rendered prompts, exactly as the trainer renders its prompts."""
    from srft_mcore.data import tokenize_records

    records = [{"index": k, "prompt": it.prompt, "demonstration": None, "answer": it.answer}
               for k, it in enumerate(items)]
    big = sys.maxsize
    ds = tokenize_records(records, tokenizer, template, max_prompt_len=big, max_response_len=big)
    return [ex.prompt_ids for ex in ds.examples]


@dataclass
class _Task:
    item: int
    sample: int
    ids: list
    sampling: object


def _tasks(ids: list, n_samples: int, sampling, context_length: Optional[int]) -> list:
    """One request per (problem, sample): its own token budget (the served context minus the
    prompt) and, when seeded, its own seed mix_seed(seed, problem, sample)."""
    from srft_mcore.rollout.seeded import mix_seed

    tasks = []
    for i, p in enumerate(ids):
        budget = sampling.max_new_tokens
        if context_length is not None:
            budget = min(budget, context_length - len(p) - CONTEXT_MARGIN)
        for j in range(n_samples):
            seed = None if sampling.seed is None else mix_seed(sampling.seed, i, j)
            s = dataclasses.replace(sampling, max_new_tokens=budget, seed=seed)
            tasks.append(_Task(i, j, p, s))
    return tasks


def _generate(client, tasks: list, progress: bool) -> list:
    """Completion (or None for a prompt longer than the context) per task, in task order."""
    from tqdm import tqdm

    todo = [k for k, t in enumerate(tasks) if t.sampling.max_new_tokens >= 1]
    workers = max(1, min(len(todo), client.max_concurrency * len(client.urls), 256))

    def run(task: _Task):
        return client.generate([task.ids], n=1, sampling=task.sampling,
                               return_logprob=False)[0][0]

    out = [None] * len(tasks)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(todo), desc="generate", unit="sample", disable=not progress,
                  file=sys.stderr) as bar:
            futures = [(k, pool.submit(run, tasks[k])) for k in todo]
            for k, future in futures:
                out[k] = future.result()
                bar.update(1)
    finally:  # a failed request stops the rest at once
        pool.shutdown(wait=True, cancel_futures=True)
    return out


# --------------------------------------------------------------------------- one split
@dataclass
class EvalResult:
    name: str
    path: str
    kind: str
    metric: str
    n: int
    """Problems."""
    samples: int
    """Samples per problem (k)."""
    acc: float
    acc_std: float
    """Standard deviation of the accuracy over the k samples (0 for k = 1)."""
    rows: list
    """One dict per generation (see :func:`run_eval`)."""
    seconds: float

    def summary(self) -> dict:
        out = {"acc": round(self.acc, 6), "n": self.n, "metric": self.metric,
               "samples": self.samples, "kind": self.kind, "path": self.path,
               "seconds": round(self.seconds, 2)}
        if self.samples > 1:
            out["acc_std"] = round(self.acc_std, 6)
        return out


def _as_client(client_or_urls):
    from srft_mcore.rollout.client import SGLangClient

    if isinstance(client_or_urls, str):
        return SGLangClient([client_or_urls])
    if isinstance(client_or_urls, (list, tuple)):
        return SGLangClient(list(client_or_urls))
    return client_or_urls


def run_eval(client_or_urls, evalset: EvalSet, tokenizer, template: str = DEFAULT_TEMPLATE,
             sampling=None, n_samples: int = 1, reward_fn: Optional[Callable] = None,
             context_length: Optional[int] = None, progress: bool = False) -> EvalResult:
    """Generate ``n_samples`` responses per problem of ``evalset`` and score them.

    ``client_or_urls``: an SGLangClient or server URL(s). ``sampling``: SamplingParams
    (default :func:`paper_sampling`); its ``seed`` makes the samples reproducible.
    ``context_length``: the served context (default: asked from the first server); each
    request's ``max_new_tokens`` is capped to fit it. ``reward_fn`` scores math answers
    instead of :func:`math_score`. Each row of the result: index, id, sample, prompt,
    answer, (choices), response, extracted, score, correct, finish_reason, tokens.
    """
    if n_samples < 1:
        raise EvalError(f"n_samples={n_samples}: need at least 1 sample per problem. Fix: "
                        f"pass n_samples >= 1")
    client = _as_client(client_or_urls)
    sampling = sampling or paper_sampling()
    eos = getattr(tokenizer, "eos_token_id", None)
    if sampling.stop_token_ids is None and eos is not None:  # the trainer's stop, too
        sampling = dataclasses.replace(sampling, stop_token_ids=[eos])
    if context_length is None:
        context_length = server_context_length(client.urls[0])
    t0 = time.time()
    ids = prompt_ids(evalset.items, tokenizer, template)
    tasks = _tasks(ids, n_samples, sampling, context_length)
    completions = _generate(client, tasks, progress)
    rows = [_row(evalset.items[t.item], t, c, reward_fn) for t, c in zip(tasks, completions)]
    correct = [[r["correct"] for r in rows[i * n_samples:(i + 1) * n_samples]]
               for i in range(len(evalset.items))]
    acc, std = sample_accuracy(correct)
    return EvalResult(name=evalset.name, path=evalset.path, kind=evalset.kind,
                      metric=metric_name(n_samples), n=len(evalset.items), samples=n_samples,
                      acc=acc, acc_std=std, rows=rows, seconds=time.time() - t0)


def _row(item: EvalItem, task: _Task, completion, reward_fn) -> dict:
    row = {"index": item.index, "id": item.id, "sample": task.sample, "prompt": item.question,
           "answer": item.answer}
    if item.choices is not None:
        row["choices"] = item.choices
    if completion is None:  # the prompt alone fills the served context
        score, extracted = 0.0, None
        row.update(response="", finish_reason="prompt_too_long", tokens=0)
    else:
        score, extracted = score_item(item, completion.text, reward_fn)
        row.update(response=completion.text, finish_reason=completion.finish_reason,
                   tokens=len(completion.token_ids))
    row.update(extracted=extracted, score=score, correct=score > 0)
    return row


def write_generations(path: str, result: EvalResult) -> str:
    from srft_mcore.data.loading import write_jsonl

    return write_jsonl(path, result.rows)


def evaluate_splits(client_or_urls, tokenizer, splits: dict, template: str = DEFAULT_TEMPLATE,
                    sampling=None, n_samples: int = 1, reward_fn: Optional[Callable] = None,
                    context_length: Optional[int] = None,
                    out_dir: Optional[str] = None) -> dict:
    """Score named splits through running SGLang servers; ``{"eval/NAME/acc": float}``.

    For evaluation during training, from one process (the trainer's rank 0) after the weight
    sync: ``client_or_urls`` is the rollout engine's ``SGLangClient`` (or the server URLs),
    so the live servers generate and no second copy of the model exists. ``splits`` maps a
    name to a file path or to an :class:`EvalSet` loaded at start-up with
    :func:`load_eval_set` (which reports bad files before training starts). The other
    arguments are those of :func:`run_eval`. ``out_dir`` (e.g. ``RUN/eval/step_000100``)
    receives ``NAME.jsonl`` with every generation and ``results.json``. Uses no
    torch.distributed.
    """
    client = _as_client(client_or_urls)
    if context_length is None:
        context_length = server_context_length(client.urls[0])
    metrics, summaries = {}, {}
    for name, split in splits.items():
        evalset = split if isinstance(split, EvalSet) else load_eval_set(split, name=name)
        result = run_eval(client, evalset, tokenizer, template, sampling, n_samples, reward_fn,
                          context_length)
        metrics[f"eval/{name}/acc"] = result.acc
        summaries[name] = result.summary()
        if out_dir is not None:
            write_generations(os.path.join(out_dir, f"{name}.jsonl"), result)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"results": summaries}, f, indent=1, sort_keys=True)
    return metrics


# --------------------------------------------------------------------------- model source
@dataclass
class ModelSource:
    """What ``--model`` points at and where its config, tokenizer and run config live."""

    kind: str
    """hf | trainer | converted | url (attached servers)"""
    path: str
    hf_dir: str
    """config.json + tokenizer (for a HF directory: the directory itself)."""
    run_config: Optional[dict] = None
    run_config_path: Optional[str] = None


def _read_run_config(path: Optional[str]) -> Optional[dict]:
    import yaml

    if path is None:
        return None
    if not os.path.isfile(path):
        raise EvalError(f"--run-config {path}: no such file. Fix: give the run's config.yaml")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise EvalError(f"{path} is not valid YAML ({e}). Fix: give the run's config.yaml")
    if not isinstance(cfg, dict):
        raise EvalError(f"{path} is not a run config (a YAML mapping). Fix: give the run's "
                        f"config.yaml")
    return cfg


def _section(cfg: Optional[dict], name: str) -> dict:
    return (cfg or {}).get(name) or {}


def _existing(path: str) -> Optional[str]:
    return path if os.path.isfile(path) else None


def _run_config_of(run_dir: str) -> Optional[str]:
    """``run_dir/config.yaml`` when run_dir is a training run's directory."""
    looks_like_run = any(os.path.exists(os.path.join(run_dir, n))
                         for n in ("metrics.jsonl", "checkpoints"))
    return _existing(os.path.join(run_dir, "config.yaml")) if looks_like_run else None


def _unwrap_run_dir(path: str) -> tuple[str, Optional[str]]:
    """A run directory -> its hf_final or latest checkpoint; a checkpoints root -> latest."""
    from srft_mcore.training.checkpoint import CheckpointError, latest_checkpoint

    run_cfg = _existing(os.path.join(path, "config.yaml"))
    try:
        if run_cfg and os.path.isfile(os.path.join(path, "hf_final", "config.json")):
            return os.path.join(path, "hf_final"), run_cfg
        if run_cfg and os.path.isdir(os.path.join(path, "checkpoints")):
            latest = latest_checkpoint(os.path.join(path, "checkpoints"))
            if latest:
                return latest, run_cfg
        if os.path.isfile(os.path.join(path, "latest")):
            latest = latest_checkpoint(path)
            return latest, _existing(os.path.join(path, os.pardir, "config.yaml"))
    except CheckpointError as e:
        raise EvalError(f"--model {path}: {e}") from None
    return path, None


def resolve_model(path: str, hf_config: Optional[str] = None,
                  run_config: Optional[str] = None) -> ModelSource:
    """Identify ``--model`` (HF directory, trainer checkpoint, converted checkpoint, run
    directory) and find its config/tokenizer directory and run config. Checks only files."""
    from tools.convert_ckpt.hf_to_mcore import BRIDGE_META, HF_SUBDIR

    if not os.path.isdir(path):
        raise EvalError(f"--model {path}: not a directory. Fix: give a HF model directory, a "
                        f"trainer checkpoint (RUN/checkpoints/step_XXXXXX) or an srft-convert "
                        f"hf-to-mcore output")
    path, found_cfg = _unwrap_run_dir(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "trainer_state.json")) and \
            os.path.isdir(os.path.join(path, "mcore")):
        kind = "trainer"
        found_cfg = found_cfg or _run_config_of(os.path.join(path, os.pardir, os.pardir))
    elif os.path.isfile(os.path.join(path, BRIDGE_META)):
        kind = "converted"
    elif os.path.isfile(os.path.join(path, "config.json")):
        kind = "hf"
        found_cfg = found_cfg or _run_config_of(os.path.join(path, os.pardir))
    else:
        raise EvalError(f"--model {path}: not a HF model directory (config.json), a trainer "
                        f"checkpoint (trainer_state.json + mcore/) or an srft-convert "
                        f"hf-to-mcore output ({BRIDGE_META}); it holds "
                        f"{sorted(os.listdir(path))[:20]}. Fix: point --model at one of those")
    cfg_path = os.path.abspath(run_config or found_cfg) if (run_config or found_cfg) else None
    cfg = _read_run_config(cfg_path)
    hf_dir = hf_config or _default_hf_dir(kind, path, cfg, HF_SUBDIR)
    return ModelSource(kind=kind, path=path, hf_dir=os.path.abspath(hf_dir), run_config=cfg,
                       run_config_path=cfg_path)


def _default_hf_dir(kind: str, path: str, cfg: Optional[dict], hf_subdir: str) -> str:
    if kind == "hf":
        return path
    if kind == "converted":
        return os.path.join(path, hf_subdir)
    if cfg is None:
        raise EvalError(f"--model {path} is a trainer checkpoint, and no run config.yaml was "
                        f"found two levels up to name its base model. Fix: pass --hf-config "
                        f"DIR (the HF model the run started from) or --run-config "
                        f"RUN/config.yaml")
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    return _section(cfg, "model").get("hf_path") or EMBEDDED_MODEL_DIR


def check_model_files(source: ModelSource) -> None:
    """config.json and tokenizer files where the server and the prompts need them."""
    from srft_mcore.models import load_hf_config
    from srft_mcore.models.tiny import MissingTokenizer, check_tokenizer_files

    try:
        load_hf_config(source.hf_dir)
        check_tokenizer_files(source.hf_dir)
    except (FileNotFoundError, MissingTokenizer) as e:
        raise EvalError(f"{e}. Fix: pass --hf-config with the base model's directory") from None
    if source.kind == "hf":
        weights = [n for n in os.listdir(source.path) if n.endswith((".safetensors", ".bin"))]
        if not weights:
            raise EvalError(f"--model {source.path}: config.json but no *.safetensors or *.bin "
                            f"weights. Fix: point --model at a complete HF checkpoint")


def stored_dtype(mcore_dir: str) -> str:
    """Dtype of the model weights in a dist checkpoint (from its metadata, not its config)."""
    from torch.distributed.checkpoint import FileSystemReader

    from srft_mcore.models.builder import DTYPES

    meta = FileSystemReader(mcore_dir).read_metadata().state_dict_metadata
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        key = next((k for k in meta if k.startswith(("embedding.", "decoder."))), None)
    if key is None:
        raise EvalError(f"{mcore_dir} holds no model weights. Fix: point --model at a "
                        f"complete trainer checkpoint")
    names = {v: k for k, v in DTYPES.items()}
    return names.get(meta[key].properties.dtype, "float32")


def stage_trainer_checkpoint(source: ModelSource, stage: str) -> str:
    """Lay a trainer checkpoint out as the converter's input (its mcore/ files linked, the
    base model's side files in hf/, the conversion record); returns ``stage``."""
    from srft_mcore.models import load_hf_config
    from tools.convert_ckpt.hf_to_mcore import BRIDGE_META, HF_SUBDIR, source_dtype
    from tools.convert_ckpt.outdir import copy_side_files

    mcore = os.path.join(source.path, "mcore")
    os.makedirs(stage)
    for name in os.listdir(mcore):
        os.symlink(os.path.join(mcore, name), os.path.join(stage, name))
    copy_side_files(source.hf_dir, os.path.join(stage, HF_SUBDIR))
    hf = load_hf_config(source.hf_dir)
    meta = {"format": "srft_mcore dist_checkpointing", "version": 1,
            "model_type": hf.get("model_type"), "source": source.path, "tp": 1, "pp": 1,
            "dtype": stored_dtype(mcore), "source_dtype": source_dtype(hf),
            "vocab_size": hf.get("vocab_size"),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}
    with open(os.path.join(stage, BRIDGE_META), "w") as f:
        json.dump(meta, f, indent=2)
    return stage


def materialize(source: ModelSource, work_dir: str) -> str:
    """A HF directory SGLang can serve: the model itself, or a conversion in ``work_dir``."""
    if source.kind == "hf":
        return source.path
    from srft_mcore.models.bridge import BridgeError
    from srft_mcore.launching.local import RankFailed
    from srft_mcore.models import UnsupportedArchitecture
    from tools.convert_ckpt.mcore_to_hf import CheckpointFormatError, mcore_to_hf

    ckpt = source.path
    if source.kind == "trainer":
        ckpt = stage_trainer_checkpoint(source, os.path.join(work_dir, "mcore_staged"))
    out = os.path.join(work_dir, "hf")
    try:
        mcore_to_hf(ckpt, out, overwrite=True)
    except (BridgeError, CheckpointFormatError, RankFailed, UnsupportedArchitecture,
            FileNotFoundError, ValueError) as e:
        raise EvalError(f"converting {source.path} to a HF checkpoint failed: {e}\nFix: pass "
                        f"--hf-config with the HF model the checkpoint was trained from "
                        f"(its config must match the checkpoint's shapes)") from None
    return out


def server_override_args(source: ModelSource) -> list:
    """The run's model.rope_theta / model.max_position_embeddings for the served model."""
    model = _section(source.run_config, "model")
    theta, positions = model.get("rope_theta"), model.get("max_position_embeddings")
    if theta is None and positions is None:
        return []
    from srft_mcore.models import load_hf_config
    from srft_mcore.rollout.server import model_override_args

    overrides = model_override_args(load_hf_config(source.hf_dir), theta, positions)
    args = ["--json-model-override-args", json.dumps(overrides, sort_keys=True)]
    if positions is not None:
        args += ["--context-length", str(int(positions))]
    return args


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srft-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF directory, trainer checkpoint, run directory or "
                                     "srft-convert hf-to-mcore output to serve")
    src.add_argument("--url", action="append", help="a running SGLang server (repeat for more)")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]FILE",
                   help="benchmark file (repeat for more); NAME defaults to the file name")
    p.add_argument("--out", help="output directory (default: srft_eval_<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace results in --out")
    p.add_argument("--hf-config", help="HF directory with config.json + tokenizer (a trainer "
                                       "checkpoint's base model; the tokenizer for --url)")
    p.add_argument("--run-config", help="the training run's config.yaml (found next to the "
                                        "checkpoint when it is in its run directory)")
    p.add_argument("--template", choices=("tokenizer", "think", "plain"),
                   help="prompt template (default: the run's data.template, else think)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem: pass@1 for "
                                                            "1, avg@k otherwise (default 1)")
    p.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE,
                   help="sampling temperature (default 0.6; 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=PAPER_MAX_NEW_TOKENS,
                   help="response length limit, capped by the served context (default 8192)")
    p.add_argument("--seed", type=int, default=None, help="reproducible sampling (seeded "
                   "Gumbel-max per sample) and the option shuffle (default: unseeded, shuffle 0)")
    p.add_argument("--prompt-key", help="field holding the problem / question")
    p.add_argument("--answer-key", help="field holding the answer (or the correct option)")
    p.add_argument("--options-key", help="field holding the options list (multiple choice)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the options' file order")
    p.add_argument("--limit", type=int, default=None, help="first N records of each file")
    p.add_argument("--reward", default=None, help="score math answers with a training reward "
                   "(a registered name such as math: boxed answers only, or module:function)")
    p.add_argument("--server-tp", type=int, default=1, help="SGLang tensor parallelism (GPU)")
    p.add_argument("--server-args", default="", help="extra SGLang flags, one string")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for the server (default 600)")
    p.add_argument("--keep-hf", action="store_true",
                   help="keep the HF conversion of a Megatron checkpoint in --out/hf_model")
    return p


def parse_data_specs(specs: Sequence[str]) -> list:
    """``[NAME=]FILE`` -> [(name, path)]; names must be unique."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec) or not re.fullmatch(r"[\w.\-]+", name):
            name, path = split_name(spec), spec
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"--data: several files are named {dup}. Fix: name them, e.g. "
                        f"--data math500=PATH")
    return out


def check_args(args) -> None:
    if args.n_samples < 1:
        raise EvalError(f"--n-samples {args.n_samples}: need at least 1. Fix: --n-samples 1 "
                        f"(pass@1) or k > 1 (avg@k)")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens}: need at least 1. Fix: "
                        f"--max-new-tokens 8192 (the paper's)")
    if args.temperature < 0:
        raise EvalError(f"--temperature {args.temperature}: must be >= 0. Fix: 0.6 (the "
                        f"paper's) or 0 for greedy")
    if not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p {args.top_p}: must be in (0, 1]. Fix: --top-p 1")
    if args.seed is not None and args.top_p < 1 and args.temperature > 0:
        raise EvalError("--seed with --top-p < 1: seeded sampling draws from the full "
                        "distribution. Fix: drop --top-p or --seed")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: must be >= 1. Fix: drop --limit or give N >= 1")


def prepare_out_dir(out: Optional[str], overwrite: bool) -> str:
    out = os.path.abspath(out or f"srft_eval_{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalError(f"--out {out}: exists and is not a directory. Fix: choose another --out")
    if os.path.isfile(os.path.join(out, "results.json")) and not overwrite:
        raise EvalError(f"--out {out} already holds results. Fix: choose another --out or add "
                        f"--overwrite")
    return out


def _url_source(urls: list, hf_config: Optional[str], run_config: Optional[str]) -> ModelSource:
    """A ModelSource for attached servers: the tokenizer from --hf-config or the server's."""
    import requests

    path = hf_config
    if path is None:
        try:
            info = requests.get(urls[0].rstrip("/") + "/model_info", timeout=30).json()
            path = info.get("tokenizer_path") or info.get("model_path")
        except (requests.RequestException, ValueError) as e:
            raise EvalError(f"--url {urls[0]}: /model_info did not answer ({e}). Fix: check "
                            f"the URL, or pass --hf-config DIR for the tokenizer") from None
        if not path or not os.path.isdir(path):
            raise EvalError(f"--url {urls[0]} serves {path!r}, not a local directory here, so "
                            f"its tokenizer cannot be read. Fix: pass --hf-config DIR")
    cfg_path = os.path.abspath(run_config) if run_config else None
    return ModelSource(kind="url", path=",".join(urls), hf_dir=os.path.abspath(path),
                       run_config=_read_run_config(cfg_path), run_config_path=cfg_path)


def resolve_template(args, source: ModelSource) -> str:
    if args.template:
        return args.template
    return _section(source.run_config, "data").get("template") or DEFAULT_TEMPLATE


def check_template(tokenizer, template: str, hf_dir: str) -> None:
    from srft_mcore.data.templates import has_chat_template

    if template == "tokenizer" and not has_chat_template(tokenizer):
        raise EvalError(f"--template tokenizer, but the tokenizer in {hf_dir} has no chat "
                        f"template (a base model?). Fix: --template think or --template plain")


def results_table(results: list, settings: dict) -> str:
    lines = [f"model: `{settings['model']}`, template {settings['template']}, temperature "
             f"{settings['temperature']}, max new tokens {settings['max_new_tokens']}, "
             f"seed {settings['seed']}", "",
             "| file | n | metric | accuracy (%) |", "|---|---|---|---|"]
    for r in results:
        std = f" +- {100 * r.acc_std:.1f}" if r.samples > 1 else ""
        lines.append(f"| {r.name} | {r.n} | {r.metric} | {100 * r.acc:.1f}{std} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, results: list, settings: dict) -> dict:
    os.makedirs(out, exist_ok=True)
    for r in results:
        write_generations(os.path.join(out, "generations", f"{r.name}.jsonl"), r)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_table(results, settings))
    summary = {"results": {r.name: r.summary() for r in results}, **settings, "out": out}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def _launch(hf_dir: str, source: ModelSource, args, out: str):
    from srft_mcore.rollout.server import ServerStartError, SGLangServer

    extra = server_override_args(source) + shlex.split(args.server_args)
    log_path = os.path.join(out, "sglang.log")
    try:
        return SGLangServer.launch(hf_dir, tp=args.server_tp, extra_args=extra,
                                   log_path=log_path, startup_timeout_s=args.startup_timeout)
    except ServerStartError as e:
        raise EvalError(f"the model could not be served: {e}\nFix: see the log above "
                        f"({log_path}); --model must be a checkpoint SGLang can load "
                        f"(complete weights that match config.json)") from None
    except ValueError as e:  # e.g. tp > 1 on CPU
        raise EvalError(f"cannot start SGLang: {e}. Fix: --server-tp 1 without GPUs") from None


def run_cli(args) -> dict:
    check_args(args)
    data = parse_data_specs(args.data)
    if args.model:
        source = resolve_model(args.model, args.hf_config, args.run_config)
        check_model_files(source)
    else:
        source = _url_source(args.url, args.hf_config, args.run_config)
    from srft_mcore.models.tiny import load_tokenizer
    from srft_mcore.reward import RewardError, get_reward_fn

    shuffle_seed = args.seed if args.seed is not None else 0
    sets = [load_eval_set(path, name, args.prompt_key, args.answer_key, args.options_key,
                          shuffle=not args.no_shuffle, seed=shuffle_seed, limit=args.limit)
            for name, path in data]
    tokenizer = load_tokenizer(source.hf_dir)
    template = resolve_template(args, source)
    check_template(tokenizer, template, source.hf_dir)
    try:
        reward_fn = get_reward_fn(args.reward) if args.reward else None
    except RewardError as e:
        raise EvalError(f"--reward: {e}. Fix: a registered name (math) or module:function")
    for s in sets:
        prompt_ids(s.items[:1], tokenizer, template)  # the template renders
    out = prepare_out_dir(args.out, args.overwrite)
    os.makedirs(out, exist_ok=True)
    print(f"srft-eval: {len(sets)} file(s): " + ", ".join(
        f"{s.name} ({len(s.items)} {s.kind}, fields {s.fields})" for s in sets), flush=True)
    t0 = time.time()
    results = _serve_and_run(source, sets, tokenizer, template, reward_fn, args, out)
    settings = {"model": source.path, "model_kind": source.kind, "template": template,
                "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "n_samples": args.n_samples,
                "seed": args.seed, "seconds": round(time.time() - t0, 2)}
    return write_outputs(out, results, settings)


def _serve_and_run(source, sets, tokenizer, template, reward_fn, args, out) -> list:
    from srft_mcore.rollout.client import SamplingParams, SGLangClient

    server, work = None, None
    try:
        if source.kind == "url":
            urls = args.url
        else:
            work = tempfile.mkdtemp(prefix=".hf_model_", dir=out)
            if source.kind != "hf":
                print(f"srft-eval: converting the {source.kind} checkpoint {source.path} "
                      f"to HF (config from {source.hf_dir})", flush=True)
            hf_dir = materialize(source, work)
            print(f"srft-eval: starting SGLang for {hf_dir}", flush=True)
            server = _launch(hf_dir, source, args, out)
            urls = [server.url]
        client = SGLangClient(urls)
        context = server_context_length(urls[0])
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens,
                                  stop_token_ids=_stop_ids(tokenizer), seed=args.seed)
        results = []
        for s in sets:
            try:
                r = run_eval(client, s, tokenizer, template, sampling, args.n_samples,
                             reward_fn, context, progress=True)
            except RuntimeError as e:  # GenerateError, or a request the server refused
                where = f"the server log {out}/sglang.log" if server else "the server's log"
                raise EvalError(f"generating for {s.name} failed: {e}\nFix: see {where}") \
                    from None
            print(f"srft-eval: {s.name}: {r.metric} = {r.acc:.4f} over {r.n} problems "
                  f"({r.seconds:.1f}s)", flush=True)
            results.append(r)
        return results
    finally:
        if server is not None:
            server.stop()
        if work is not None:
            if args.keep_hf and os.path.isdir(os.path.join(work, "hf")):
                keep = os.path.join(out, "hf_model")
                shutil.rmtree(keep, ignore_errors=True)
                os.replace(os.path.join(work, "hf"), keep)
            shutil.rmtree(work, ignore_errors=True)


def _stop_ids(tokenizer) -> Optional[list]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else None


def _input_errors() -> tuple:
    from srft_mcore.data import DataError, TemplateError
    from srft_mcore.reward import RewardError
    from srft_mcore.rollout.client import GenerateError

    return (EvalError, DataError, TemplateError, RewardError, GenerateError, FileNotFoundError)


def main(argv=None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    try:
        summary = run_cli(args)
    except _input_errors() as e:
        print(f"srft-eval: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"ok": False, "error": str(e).splitlines()[0]}), flush=True)
        return 2
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
