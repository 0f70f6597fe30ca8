"""Tokenised prompt records: rendered prompt ids, demonstration ids ending with eos,
length filtering with a count of what was dropped, and :func:`build_dataset` from config.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from .embedded import held_out_prompts, write_embedded_dataset
from .loading import DataError, load_records
from .templates import render_prompt

log = logging.getLogger(__name__)

EMBEDDED_FILE = "embedded_task.jsonl"


@dataclass
class Example:
    """One prompt record ready for rollouts and for the SFT / off-policy terms."""

    index: int
    """Position of the record in the source file."""
    prompt: str
    """The raw problem text (what the reward function receives as ``prompt``)."""
    prompt_text: str
    """The rendered prompt (template applied) that the policy continues."""
    prompt_ids: list
    """Token ids of ``prompt_text``."""
    answer: str
    """Reference answer for the reward."""
    demonstration: Optional[str] = None
    """Expert demonstration text (None without demonstrations)."""
    demo_ids: Optional[list] = None
    """Token ids of the demonstration, ending with the eos id (None without demonstrations)."""
    demo_reward: Optional[float] = None
    """The demonstration's reward in its group: None = trusted as 1.0 (the paper); set from
    reward.fn by data.verify_demos (srft_mcore/data/demo_quality.py)."""


@dataclass
class FilterStats:
    total: int = 0
    kept: int = 0
    prompt_too_long: int = 0
    demo_too_long: int = 0

    @property
    def filtered(self) -> int:
        return self.total - self.kept

    def summary(self, max_prompt_len: int, max_response_len: int) -> str:
        return (f"data: {self.total} records, kept {self.kept}, filtered {self.filtered} "
                f"(prompt > {max_prompt_len} tokens: {self.prompt_too_long}, "
                f"demonstration > {max_response_len} tokens: {self.demo_too_long})")


@dataclass
class PromptDataset:
    examples: list
    stats: FilterStats = field(default_factory=FilterStats)
    demo_quality: Optional[object] = None
    """What data.demo_quality did (a DemoQualityReport), None when it did nothing."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def batch(self, indices) -> list:
        return [self.examples[i] for i in indices]


def _encode(tokenizer, texts: list, chunk: int = 1024) -> list:
    out = []
    for s in range(0, len(texts), chunk):
        out.extend(tokenizer(texts[s:s + chunk], add_special_tokens=False)["input_ids"])
    return out


def _prepend_bos(tokenizer, ids: list, template: str) -> list:
    """Plain-format prompts get the BOS a base model was trained with (chat templates
    already write it themselves)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or template == "tokenizer" or (ids and ids[0] == bos):
        return ids
    if template == "think" and getattr(tokenizer, "chat_template", None):
        return ids
    return [bos] + ids


def tokenize_records(records: list, tokenizer, template: str = "tokenizer",
                     max_prompt_len: int = 256, max_response_len: int = 256) -> PromptDataset:
    """Render and tokenise ``records`` (dicts from :func:`load_records`); drop those whose
    prompt is longer than ``max_prompt_len`` or whose demonstration (with eos) is longer
    than ``max_response_len`` tokens."""
    eos = tokenizer.eos_token_id
    has_demo = bool(records) and records[0]["demonstration"] is not None
    if has_demo and eos is None:
        raise DataError("the tokenizer has no eos token, so demonstrations cannot be "
                        "terminated. Fix: use a tokenizer with eos_token set")
    texts = [render_prompt(tokenizer, r["prompt"], template) for r in records]
    prompt_ids = [_prepend_bos(tokenizer, ids, template) for ids in _encode(tokenizer, texts)]
    demo_ids = ([ids + [eos] for ids in _encode(tokenizer, [r["demonstration"] for r in records])]
                if has_demo else [None] * len(records))
    stats = FilterStats(total=len(records))
    examples = []
    for r, text, p_ids, d_ids in zip(records, texts, prompt_ids, demo_ids):
        if len(p_ids) > max_prompt_len:
            stats.prompt_too_long += 1
            continue
        if d_ids is not None and len(d_ids) > max_response_len:
            stats.demo_too_long += 1
            continue
        examples.append(Example(index=r["index"], prompt=r["prompt"], prompt_text=text,
                                prompt_ids=p_ids, answer=r["answer"],
                                demonstration=r["demonstration"], demo_ids=d_ids))
    stats.kept = len(examples)
    return PromptDataset(examples, stats)


def build_dataset(data_cfg, tokenizer, run_dir: Optional[str] = None, require_demo: bool = True,
                  embedded: Optional[dict] = None,
                  report: Optional[Callable[[str], None]] = None) -> PromptDataset:
    """Load, template, tokenise and length-filter the data named by ``data_cfg``
    (a :class:`srft_mcore.config.DataConfig`).

    ``data_cfg.path=None`` writes the embedded arithmetic task to
    ``<run_dir>/embedded_task.jsonl`` (``embedded``: keyword arguments of
    :func:`write_embedded_dataset`, default 2000 records from seed 0) and reads it back
    through the same code as user data. ``require_demo=False`` (pure RL)
    does not read demonstrations; otherwise ``data_cfg.demo_quality`` corrupts them (before
    tokenising and length filtering; ``ds.demo_quality`` holds its report). ``report``
    receives the filtering and corruption summaries (default: log).
    """
    path = data_cfg.path
    if path is None:
        if run_dir is None:
            raise DataError("data.path is unset (embedded task) and no run_dir was given to "
                            "write it to")
        path = os.path.join(run_dir, EMBEDDED_FILE)
        write_embedded_dataset(path, **{"n": 2000, "seed": 0, "exclude": held_out_prompts(),
                                        **(embedded or {})})
    records = load_records(path, data_cfg.prompt_key,
                           data_cfg.demo_key if require_demo else None, data_cfg.answer_key)
    quality = None
    if require_demo:  # the one place training demonstrations are corrupted (never eval data)
        from .demo_quality import corrupt

        records, quality = corrupt(records, data_cfg.demo_quality, data_cfg.prompt_key,
                                   data_cfg.demo_key)
        if quality.active:
            (report or log.info)(quality.summary())
        else:
            quality = None
    ds = tokenize_records(records, tokenizer, data_cfg.template, data_cfg.max_prompt_len,
                          data_cfg.max_response_len)
    ds.demo_quality = quality
    msg = ds.stats.summary(data_cfg.max_prompt_len, data_cfg.max_response_len)
    (report or log.info)(msg)
    if len(ds) == 0:
        raise DataError(f"{msg}: nothing left to train on. Fix: raise data.max_prompt_len / "
                        f"data.max_response_len or use shorter records")
    return ds
