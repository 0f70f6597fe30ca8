"""Deliberately imperfect demonstrations (``data.demo_quality``), to study how SRFT degrades
when its demonstrations are not expert quality.

:func:`corrupt` is a pure function of the training records, the
:class:`~srft_mcore.config.DemoQualityConfig` fields and its ``seed``: no algorithm,
learning rate or train seed enters, so every method of a comparison trains on the same
corrupted demonstrations. In this order:

1. ``source``: every demonstration is replaced by the one another file gives for the same
   prompt (exact text, surrounding whitespace ignored; the first of duplicates wins). A
   training prompt the file lacks is an error (``source_missing=error``: a silent mix of
   expert and replacement demonstrations would confound the study) or keeps its own
   (``source_missing=keep``, listed in the report);
2. ``wrong_fraction``: ``round_half_up(fraction * records)`` demonstrations become well-formed
   wrong ones. ``slip`` (embedded-task chains): one step's result is off by a small nonzero
   amount and every later step is computed from the wrong value, so the chain stays
   consistent, the text keeps the generator's exact format and the boxed answer is wrong.
   ``swap`` (any data): the demonstration of another chosen problem (a seeded cyclic
   permutation, so none keeps its own), repaired so that its final answer is not the
   record's answer; ``auto``: slip when every demonstration is an embedded chain, else swap;
3. ``truncate_fraction``: as many of the *other* demonstrations (disjoint from the wrong
   ones; capped at what is left) cut at a seeded character position strictly inside the
   text and before the final answer (the last ``\\boxed``, else the text after the last
   ``</think>``), so no final answer survives when the text has one after its first
   character. The tokenizer still appends eos, as to every demonstration of the data.

The chosen records are nested across fractions: with one seed, the wrong demonstrations of
fraction 0.2 are among those of 0.4, and a record's slip or cut depends only on the seed and
its index. Demonstrations go through the length filter afterwards (a swapped or source one
may be longer). Only the training data is touched; evaluation splits are read elsewhere.

``data.verify_demos`` (default false, the paper's trusted expert: a demonstration counts as
reward 1) scores every demonstration once at start with ``reward.fn`` against its answer
(:func:`score_demonstrations`); its reward in its group (Eq. 7) is then that score.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from .loading import DataError

# the embedded generator's demonstration: "<think> 5 + 3 = 8. 8 * 2 = 16. </think> \boxed{16}"
_STEP = re.compile(r"(-?\d+) ([+\-*]) (\d+) = (-?\d+)\.")
_CHAIN = re.compile(r"<think> (.+) </think> \\boxed\{(-?\d+)\}")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
SLIP_OFFSETS = (-2, -1, 1, 2)
"""How far a slipped step's result is off (small, nonzero)."""


def count_for(fraction: float, n: int) -> int:
    """Records a fraction stands for: round half up (0.5 * 3 -> 2), within 0..n."""
    return max(0, min(n, int(fraction * n + 0.5)))


def _apply(sym: str, x: int, d: int) -> int:
    return x + d if sym == "+" else x - d if sym == "-" else x * d


def parse_chain(demo: str) -> Optional[list]:
    """The steps ``[(a, sym, d, b), ...]`` of an embedded-task demonstration, or None when
    ``demo`` is not one: exactly the generator's format (re-rendering gives the same text)
    and a consistent chain (each step starts from the last result, computes right, and the
    box holds the final result)."""
    m = _CHAIN.fullmatch(demo)
    if m is None:
        return None
    steps = [(int(a), s, int(d), int(b)) for a, s, d, b in _STEP.findall(m.group(1))]
    if not steps or render_chain(steps) != demo:
        return None
    for k, (a, s, d, b) in enumerate(steps):
        if _apply(s, a, d) != b or (k and a != steps[k - 1][3]):
            return None
    return steps


def render_chain(steps: list) -> str:
    """The generator's text of a chain (srft_mcore.data.embedded.make_problem)."""
    work = " ".join(f"{a} {s} {d} = {b}." for a, s, d, b in steps)
    return f"<think> {work} </think> \\boxed{{{steps[-1][3]}}}"


def slip(demo: str, rng: random.Random) -> tuple:
    """``(wrong text, info)``: one step's result off by an offset from :data:`SLIP_OFFSETS`,
    later steps computed from it. Only slips that keep every value >= 1 are drawn (the
    generator's values are positive; +1 always qualifies)."""
    steps = parse_chain(demo)
    if steps is None:
        raise ValueError(f"not an embedded-task chain: {demo!r}")
    options = []
    for k in range(len(steps)):
        for off in SLIP_OFFSETS:
            new = _slipped(steps, k, off)
            if all(b >= 1 for *_, b in new):
                options.append((k, off, new))
    k, off, new = rng.choice(options)
    # a step's offset survives +, - and * by d >= 1, so the final answer always changes
    assert new[-1][3] != steps[-1][3]
    return render_chain(new), {"kind": "slip", "step": k, "offset": off,
                               "final": str(new[-1][3])}


def _slipped(steps: list, k: int, off: int) -> list:
    out = [tuple(s) for s in steps[:k]]
    a, s, d, b = steps[k]
    out.append((a, s, d, b + off))
    for _, s, d, _ in steps[k + 1:]:
        x = out[-1][3]
        out.append((x, s, d, _apply(s, x, d)))
    return out


def answer_start(text: str) -> Optional[int]:
    """Where the final answer begins: the last ``\\boxed``/``\\fbox``, else the non-empty
    text after the last ``</think>``; None when the text has neither."""
    boxes = [m.start() for m in _BOX.finditer(text)]
    if boxes:
        return boxes[-1]
    if "</think>" in text:
        end = text.rindex("</think>") + len("</think>")
        tail = text[end:]
        if tail.strip():
            return end + (len(tail) - len(tail.lstrip()))
    return None


def truncate(demo: str, rng: random.Random) -> tuple:
    """``(cut text, cut)``: ``demo[:cut]`` with ``0 < cut < len(demo)``, and ``cut`` at most
    :func:`answer_start` so the final answer is gone (unless it starts the text)."""
    start = answer_start(demo)
    hi = len(demo) - 1
    if start is not None and start >= 1:
        hi = min(hi, start)
    cut = rng.randint(1, hi)
    return demo[:cut], cut


@dataclass
class DemoQualityReport:
    """What :func:`corrupt` did, by record index (the position in the data file)."""

    records: int
    seed: int
    wrong_fraction: float = 0.0
    wrong_kind: Optional[str] = None
    """slip | swap as used (auto resolved); None when nothing was made wrong."""
    truncate_fraction: float = 0.0
    source: Optional[str] = None
    wrong: list = field(default_factory=list)
    """One dict per wrong demonstration: index, kind, and step/offset/final (slip) or
    from (swap: the index whose demonstration it got)."""
    truncated: list = field(default_factory=list)
    """One dict per cut demonstration: index, cut (characters kept), length."""
    replaced: int = 0
    """Records whose demonstration came from ``source``."""
    unmatched: list = field(default_factory=list)
    """Indices whose prompt ``source`` lacks (kept their own: source_missing=keep)."""
    source_duplicates: int = 0
    """Prompts ``source`` holds more than once (the first was used)."""
    digest: str = ""
    """sha256 of every demonstration after corruption: equal digests, equal training data."""

    @property
    def active(self) -> bool:
        return bool(self.wrong or self.truncated or self.source is not None)

    @property
    def wrong_indices(self) -> list:
        return [w["index"] for w in self.wrong]

    @property
    def truncated_indices(self) -> list:
        return [t["index"] for t in self.truncated]

    def summary(self) -> str:
        src = (f", {self.replaced} replaced from {self.source} ({len(self.unmatched)} "
               f"unmatched kept)" if self.source is not None else "")
        kind = f" ({self.wrong_kind})" if self.wrong else ""
        return (f"demo_quality: {self.records} demonstrations, seed {self.seed}: "
                f"{len(self.wrong)} wrong{kind}, {len(self.truncated)} truncated{src}; "
                f"digest {self.digest[:12]}")

    def to_dict(self) -> dict:
        return asdict(self)


def _digest(records: list) -> str:
    return hashlib.sha256(json.dumps([r["demonstration"] for r in records]).encode()).hexdigest()


def read_source(path: str, prompt_key: str = "prompt",
                demo_key: str = "demonstration") -> tuple:
    """``({prompt: demonstration}, duplicates)`` of a source file: the formats data.path
    accepts, the same field names; the first demonstration of a repeated prompt wins."""
    from .loading import _check_column, _check_field, _read

    try:
        ds = _read(path)
        if len(ds) == 0:
            raise DataError(f"{path!r} holds no records")
        for key, option in ((prompt_key, "data.prompt_key"), (demo_key, "data.demo_key")):
            _check_column(ds, key, option, path)
        prompts = _check_field(ds, prompt_key, "data.prompt_key", path)
        demos = _check_field(ds, demo_key, "data.demo_key", path)
    except DataError as e:
        msg = str(e).replace(f"data.path={path!r}", f"{path!r}")
        raise DataError(f"data.demo_quality.source={path!r}: {msg}") from None
    table, duplicates = {}, 0
    for p, d in zip(prompts, demos):
        key = p.strip()
        if key in table:
            duplicates += 1
        else:
            table[key] = d
    return table, duplicates


def _wrong_for(rec: dict, demo: str, answer: str) -> bool:
    """``demo`` does not answer ``rec``: another reference answer, and scoring it against
    the record's answer (strict math rules) gives 0."""
    from srft_mcore.reward import normalize_answer, strict_math_score

    if normalize_answer(str(answer)) == normalize_answer(str(rec["answer"])):
        return False
    return strict_math_score(demo, rec["answer"]).score == 0.0


def _swap(out: list, chosen: list, demos: list, rng: random.Random) -> list:
    """Give each chosen position another problem's demonstration (``demos``: the texts
    before this step) whose answer is wrong for it; returns the donor position of each."""
    k = len(chosen)
    perm = list(range(k))
    for i in range(k - 1, 0, -1):  # Sattolo: one k-cycle, so no position keeps its own
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    donor = [chosen[perm[i]] for i in range(k)]

    def ok(i, d):
        return d != chosen[i] and _wrong_for(out[chosen[i]], demos[d], out[d]["answer"])

    for i in range(k):
        if ok(i, donor[i]):
            continue
        # repair by exchanging donors with another chosen position, else take any record
        others = [j for j in range(k) if j != i]
        rng.shuffle(others)
        j = next((j for j in others if ok(i, donor[j]) and ok(j, donor[i])), None)
        if j is not None:
            donor[i], donor[j] = donor[j], donor[i]
            continue
        pool = list(range(len(out)))
        rng.shuffle(pool)
        d = next((d for d in pool if ok(i, d)), None)
        if d is None:
            raise DataError(f"data.demo_quality.wrong_kind=swap: no demonstration in the data "
                            f"has a final answer other than record {out[chosen[i]]['index']}'s "
                            f"({out[chosen[i]]['answer']!r}). Fix: use data with different "
                            f"answers, or data.demo_quality.wrong_fraction=0")
        donor[i] = d
    for i, d in zip(chosen, donor):
        out[i]["demonstration"] = demos[d]
    return donor


def corrupt(records: list, cfg, prompt_key: str = "prompt",
            demo_key: str = "demonstration") -> tuple:
    """``(records, report)``: a corrupted copy of ``records`` (dicts of
    :func:`~srft_mcore.data.load_records`, with demonstrations) under ``cfg`` (a
    :class:`~srft_mcore.config.DemoQualityConfig`) and a :class:`DemoQualityReport`.
    ``prompt_key`` / ``demo_key`` name the fields of ``cfg.source``. Pure: the input is not
    changed, and the output depends only on the records, ``cfg`` and ``cfg.seed``."""
    out = [dict(r) for r in records]
    report = DemoQualityReport(records=len(out), seed=cfg.seed,
                               wrong_fraction=cfg.wrong_fraction,
                               truncate_fraction=cfg.truncate_fraction, source=cfg.source)
    if any(r["demonstration"] is None for r in out):
        raise DataError("data.demo_quality: the records have no demonstrations to corrupt "
                        "(data.demo_key was not read)")
    n = len(out)
    if cfg.source is not None:
        table, report.source_duplicates = read_source(cfg.source, prompt_key, demo_key)
        for r in out:
            demo = table.get(r["prompt"].strip())
            if demo is None:
                report.unmatched.append(r["index"])
            else:
                r["demonstration"] = demo
                report.replaced += 1
        if report.unmatched and cfg.source_missing != "keep":
            shown = ", ".join(str(i) for i in report.unmatched[:10])
            first = next(r for r in out if r["index"] == report.unmatched[0])["prompt"]
            raise DataError(f"data.demo_quality.source={cfg.source!r} has no demonstration for "
                            f"{len(report.unmatched)} of {n} training prompts (record index "
                            f"{shown}{' ...' if len(report.unmatched) > 10 else ''}; the first: "
                            f"{first[:80]!r}; prompts match by exact text). Fix: add them to "
                            f"the source file, drop them from data.path, or set "
                            f"data.demo_quality.source_missing=keep to keep their own")
    n_wrong = count_for(cfg.wrong_fraction, n)
    order_w = list(range(n))
    random.Random(f"demo_quality:{cfg.seed}:wrong").shuffle(order_w)
    wrong = sorted(order_w[:n_wrong])
    if wrong:
        kind = cfg.wrong_kind
        if kind == "auto":
            kind = "slip" if all(parse_chain(r["demonstration"]) for r in out) else "swap"
        report.wrong_kind = kind
        if kind == "slip":
            for i in wrong:
                demo = out[i]["demonstration"]
                if parse_chain(demo) is None:
                    raise DataError(f"data.demo_quality.wrong_kind=slip: record {out[i]['index']}"
                                    f"'s demonstration is not an embedded-task chain "
                                    f"({demo[:80]!r}). Fix: wrong_kind=swap (or auto) for "
                                    f"other data")
                rng = random.Random(f"demo_quality:{cfg.seed}:slip:{out[i]['index']}")
                out[i]["demonstration"], info = slip(demo, rng)
                report.wrong.append({"index": out[i]["index"], **info})
        else:
            demos = [r["demonstration"] for r in out]
            donors = _swap(out, wrong, demos, random.Random(f"demo_quality:{cfg.seed}:swap"))
            report.wrong = [{"index": out[i]["index"], "kind": "swap", "from": out[d]["index"]}
                            for i, d in zip(wrong, donors)]
    # the other records, in their own seeded order; a 1-character text cannot be cut inside
    taken = set(wrong)
    order_t = list(range(n))
    random.Random(f"demo_quality:{cfg.seed}:truncate").shuffle(order_t)
    order_t = [i for i in order_t if i not in taken and len(out[i]["demonstration"]) >= 2]
    for i in sorted(order_t[:count_for(cfg.truncate_fraction, n)]):
        demo = out[i]["demonstration"]
        rng = random.Random(f"demo_quality:{cfg.seed}:cut:{out[i]['index']}")
        out[i]["demonstration"], cut = truncate(demo, rng)
        report.truncated.append({"index": out[i]["index"], "cut": cut, "length": len(demo)})
    report.digest = _digest(out)
    return out, report


def score_demonstrations(examples: list, reward_fn, pool=None) -> tuple:
    """``(scores, timeouts)``: each example's demonstration scored by ``reward_fn`` against
    its answer (in ``pool``'s workers with their time limit when given, like the rollouts)."""
    from srft_mcore.reward import score_batch

    args = ([ex.demonstration for ex in examples], [ex.answer for ex in examples],
            [ex.prompt for ex in examples])
    if pool is not None:
        return pool.score(*args)
    return score_batch(reward_fn, *args), 0


def set_demo_rewards(examples: list, scores: list) -> dict:
    """Store each demonstration's verified reward (``Example.demo_reward``, which
    build_sequences uses instead of 1.0); returns the summary the run records."""
    if len(scores) != len(examples):
        raise ValueError(f"{len(scores)} demonstration scores for {len(examples)} examples")
    for ex, s in zip(examples, scores):
        ex.demo_reward = float(s)
    below = [ex.index for ex, s in zip(examples, scores) if s < 1.0]
    return {"scored": len(examples), "reward_1": len(examples) - len(below),
            "below_1": below}


def verification_summary(verified: dict, timeouts: int = 0) -> str:
    """The start-up line of data.verify_demos."""
    n, ok = verified["scored"], verified["reward_1"]
    text = (f"verify_demos: {ok} of {n} demonstrations score 1 against their answers; the "
            f"other {n - ok} keep their score as their reward in their groups")
    if timeouts:
        text += f" ({timeouts} hit reward.timeout_s and score 0)"
    if n and ok == 0:
        text += (". None scores 1: reward.fn may not read these demonstrations (the math "
                 "reward needs a \\boxed{} answer); data.verify_demos=false trusts them")
    return text


def write_record(path: str, report: Optional[DemoQualityReport],
                 verified: Optional[dict] = None) -> Optional[str]:
    """``demo_quality.json`` of a run: the report and the verification, when either exists."""
    if report is None and verified is None:
        return None
    record = {**(report.to_dict() if report is not None else {}),
              **({"verify_demos": verified} if verified is not None else {})}
    tmp = path + ".tmp"  # atomic: a reader never sees half a record
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path
