"""Generation and scoring of evaluation sets through running SGLang servers: one set
(:func:`run_eval`) or the named splits of evaluation during training (:func:`evaluate_splits`)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from srft_mcore.evaluation.errors import EvalError
from srft_mcore.evaluation.records import EvalItem, EvalSet, load_eval_set
from srft_mcore.evaluation.scoring import metric_name, sample_accuracy, score_response

PAPER_TEMPERATURE = 0.6
PAPER_MAX_NEW_TOKENS = 8192
DEFAULT_TEMPLATE = "think"
CONTEXT_MARGIN = 2
"""Tokens kept free below the served context length (SGLang keeps a request below it)."""


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
    truncation_rate: float = 0.0
    """Share of the generations that stopped at the length limit (each scores 0)."""
    mean_tokens: float = 0.0
    """Mean response length in tokens over the generations."""
    rules: dict = dataclasses.field(default_factory=dict)
    """How many generations each scoring rule decided (``boxed``, ``truncated``, ...)."""

    def summary(self) -> dict:
        out = {"acc": round(self.acc, 6), "n": self.n, "metric": self.metric,
               "samples": self.samples, "kind": self.kind, "path": self.path,
               "seconds": round(self.seconds, 2),
               "truncation_rate": round(self.truncation_rate, 6),
               "mean_tokens": round(self.mean_tokens, 2), "rules": dict(self.rules)}
        if self.samples > 1:
            out["acc_std"] = round(self.acc_std, 6)
        return out


def generation_stats(rows: Sequence[dict]) -> tuple[float, float, dict]:
    """(truncation rate, mean tokens, count per rule) of result rows."""
    n = max(len(rows), 1)
    truncated = sum(r["finish_reason"] == "length" for r in rows) / n
    mean_tokens = sum(r["tokens"] for r in rows) / n
    rules: dict = {}
    for r in rows:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    return truncated, mean_tokens, dict(sorted(rules.items()))


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
    instead of the strict math rules (a response cut off by the length limit scores 0
    either way). Each row of the result: index, id, sample, prompt, answer, (choices),
    response, extracted, rule (the scoring rule that decided, see scoring.py), score,
    correct, finish_reason, tokens. The result also reports the truncation rate, the mean
    response length and the count of each rule.
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
    truncated, mean_tokens, rules = generation_stats(rows)
    return EvalResult(name=evalset.name, path=evalset.path, kind=evalset.kind,
                      metric=metric_name(n_samples), n=len(evalset.items), samples=n_samples,
                      acc=acc, acc_std=std, rows=rows, seconds=time.time() - t0,
                      truncation_rate=truncated, mean_tokens=mean_tokens, rules=rules)


def _row(item: EvalItem, task: _Task, completion, reward_fn) -> dict:
    row = {"index": item.index, "id": item.id, "sample": task.sample, "prompt": item.question,
           "answer": item.answer}
    if item.choices is not None:
        row["choices"] = item.choices
    if completion is None:  # the prompt alone fills the served context
        score, extracted, rule = 0.0, None, "prompt_too_long"
        row.update(response="", finish_reason="prompt_too_long", tokens=0)
    else:
        score, extracted, rule = score_response(item, completion.text,
                                                completion.finish_reason, reward_fn)
        row.update(response=completion.text, finish_reason=completion.finish_reason,
                   tokens=len(completion.token_ids))
    row.update(extracted=extracted, rule=rule, score=score, correct=score > 0)
    return row


def write_generations(path: str, result: EvalResult) -> str:
    from srft_mcore.data.loading import write_jsonl

    return write_jsonl(path, result.rows)


def evaluate_splits(client_or_urls, tokenizer, splits: dict, template: str = DEFAULT_TEMPLATE,
                    sampling=None, n_samples: int = 1, reward_fn: Optional[Callable] = None,
                    context_length: Optional[int] = None,
                    out_dir: Optional[str] = None) -> dict:
    """Score named splits through running SGLang servers; per split ``eval/NAME/acc``,
    ``eval/NAME/truncation_rate`` (share of generations cut off by the length limit) and
    ``eval/NAME/mean_tokens`` (mean response length).

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
        metrics[f"eval/{name}/truncation_rate"] = result.truncation_rate
        metrics[f"eval/{name}/mean_tokens"] = result.mean_tokens
        summaries[name] = result.summary()
        if out_dir is not None:
            write_generations(os.path.join(out_dir, f"{name}.jsonl"), result)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"results": summaries}, f, indent=1, sort_keys=True)
    return metrics
