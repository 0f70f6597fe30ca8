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
  without a box on what math-verify's own extraction finds in its final-answer part (the
  non-empty text after the last ``</think>``, or the whole response when it has no think
  block); a response with neither (reasoning that never ended: a ``<think>`` never closed,
  nothing after ``</think>``) scores 0.
- multiple choice (ARC-C, GPQA-Diamond, MMLU-Pro): a question, an options list (``options``,
  ``choices``, or GPQA's ``Correct Answer`` + ``Incorrect Answer N`` columns) and the correct
  option as a letter, a 0-based index, a label or the option's text. The options are shuffled
  with a RNG seeded per item, shown as ``A. ...``; the letter is taken from the response (a
  boxed letter, else the last cue ``Answer: X`` / ``answer is (X)`` / ``option is X``, else
  the last standalone capital letter, never the word "A" or "I") and checked against the
  correct option's shuffled position. ``--no-shuffle`` is refused for a file whose correct
  option sits at the same position in every record.

Scoring is strict, as for the training reward: a response that stopped at the length limit
(finish reason ``length``) scores 0 whatever its text holds. Each generation records the rule
that decided its score (``boxed``, ``after_think``, ``truncated``, ``no_answer``,
``choice_boxed``, ``choice_cue``, ``choice_letter``).

Decoding follows arXiv 2506.19767's evaluation: temperature 0.6, up to 8192 new tokens (capped
by the served context), ``--n-samples k`` samples per problem: pass@1 for k = 1, avg@k (the
mean over the k samples of the accuracy) otherwise. ``--seed`` makes sampling reproducible
(rollout/seeded.py). The prompt template is the training run's (``data.template`` in the run's
``config.yaml``) when the model comes from a run, else ``think`` (the paper's prompt).

Output in ``--out``: ``results.md`` (one row per file), ``results.json``, and
``generations/NAME.jsonl`` (every sample with its extracted answer, rule and score). The last
line printed is one JSON object: ``{"results": {NAME: {"acc", "n", "metric",
"truncation_rate", "mean_tokens", "rules", ...}}, ...}``.

In training, :func:`evaluate_splits` scores splits with the same code through the trainer's
live servers (an :class:`~srft_mcore.rollout.client.SGLangClient`), returning
``eval/NAME/acc``, ``eval/NAME/truncation_rate`` and ``eval/NAME/mean_tokens``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from srft_mcore.evaluation.errors import EvalError
from srft_mcore.evaluation.models import (ModelSource, check_model_files, config_section,
                                          materialize, resolve_model, server_override_args,
                                          url_source)
from srft_mcore.evaluation.records import check_unshuffled, load_eval_set, split_name
from srft_mcore.evaluation.runner import (DEFAULT_TEMPLATE, PAPER_MAX_NEW_TOKENS,
                                          PAPER_TEMPERATURE, prompt_ids, run_eval,
                                          server_context_length, write_generations)


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
    p.add_argument("--no-shuffle", action="store_true", help="keep the options' file order "
                   "(refused when the correct option has the same position in every record)")
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


def resolve_template(args, source: ModelSource) -> str:
    if args.template:
        return args.template
    return config_section(source.run_config, "data").get("template") or DEFAULT_TEMPLATE


def check_template(tokenizer, template: str, hf_dir: str) -> None:
    from srft_mcore.data.templates import has_chat_template

    if template == "tokenizer" and not has_chat_template(tokenizer):
        raise EvalError(f"--template tokenizer, but the tokenizer in {hf_dir} has no chat "
                        f"template (a base model?). Fix: --template think or --template plain")


def results_table(results: list, settings: dict) -> str:
    lines = [f"model: `{settings['model']}`, template {settings['template']}, temperature "
             f"{settings['temperature']}, max new tokens {settings['max_new_tokens']}, "
             f"seed {settings['seed']}", "",
             "| file | n | metric | accuracy (%) | truncated (%) | mean tokens |",
             "|---|---|---|---|---|---|"]
    for r in results:
        std = f" +- {100 * r.acc_std:.1f}" if r.samples > 1 else ""
        lines.append(f"| {r.name} | {r.n} | {r.metric} | {100 * r.acc:.1f}{std} | "
                     f"{100 * r.truncation_rate:.1f} | {r.mean_tokens:.1f} |")
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
        source = url_source(args.url, args.hf_config, args.run_config)
    from srft_mcore.models.tiny import load_tokenizer
    from srft_mcore.reward import RewardError, get_reward_fn

    shuffle_seed = args.seed if args.seed is not None else 0
    sets = [load_eval_set(path, name, args.prompt_key, args.answer_key, args.options_key,
                          shuffle=not args.no_shuffle, seed=shuffle_seed, limit=args.limit)
            for name, path in data]
    if args.no_shuffle:
        for s in sets:
            check_unshuffled(s)
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
            print(f"srft-eval: {s.name}: {r.metric} = {r.acc:.4f} over {r.n} problems, "
                  f"truncated {100 * r.truncation_rate:.1f}%, mean {r.mean_tokens:.1f} tokens "
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
