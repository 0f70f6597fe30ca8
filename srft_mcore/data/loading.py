"""Reading prompt / demonstration / answer records from local files with ``datasets``.

Accepted: ``.jsonl`` / ``.json``, ``.parquet``, ``.arrow`` files, or a directory written by
``Dataset.save_to_disk`` (a ``DatasetDict`` gives its ``train`` split, or its only split).
Field problems are reported by record index and field name right after reading, before
any templating or tokenisation.
"""
from __future__ import annotations

import json
import os
from typing import Optional

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
ACCEPTED = ".jsonl, .json, .parquet, .arrow files or a datasets save_to_disk directory"


def write_jsonl(path: str, records) -> str:
    """Write records as jsonl, atomically (a reader never sees half a file); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


class DataError(ValueError):
    """A data file or record problem; the message names the path / record and the fix."""


def _read(path: str):
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"data.path={path!r} is a directory but not a datasets "
                            f"save_to_disk directory ({type(e).__name__}: {e}). Accepted: "
                            f"{ACCEPTED}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise DataError(f"data.path={path!r} holds splits {sorted(ds)} and none is "
                                f"'train'. Fix: point data.path at one split's directory")
        return ds
    if not os.path.exists(path):
        raise DataError(f"data.path={path!r} does not exist. Accepted: {ACCEPTED}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise DataError(f"data.path={path!r}: unknown format {ext or '(no extension)'!r}. "
                        f"Accepted: {ACCEPTED}")
    try:
        return datasets.load_dataset(FORMATS[ext], data_files=path, split="train")
    except Exception as e:
        raise DataError(f"data.path={path!r} could not be read as {FORMATS[ext]} "
                        f"({type(e).__name__}: {str(e)[:300]}). Accepted: {ACCEPTED}") from None


def _check_column(ds, key: str, option: str, path: str) -> None:
    if key not in ds.column_names:
        raise DataError(f"{path}: no field {key!r} ({option}={key!r}); the records have "
                        f"fields {ds.column_names}. Fix: set {option} to one of them")


def _check_field(ds, key: str, option: str, path: str) -> list:
    values = ds[key]
    bad = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(f"{path}: {len(bad)} record(s) have no {key!r} ({option}): record "
                        f"index {shown}. Fix: drop or complete those records")
    wrong = [i for i, v in enumerate(values) if not isinstance(v, (str, int, float))]
    if wrong:
        raise DataError(f"{path}: field {key!r} of record {wrong[0]} is a "
                        f"{type(values[wrong[0]]).__name__}, expected text")
    return [v if isinstance(v, str) else str(v) for v in values]


def load_records(path: str, prompt_key: str = "prompt",
                 demo_key: Optional[str] = "demonstration",
                 answer_key: str = "answer") -> list:
    """Records as dicts with the standard keys ``prompt``, ``demonstration``, ``answer``
    (plus ``index``, the record's position in the file).

    ``demo_key=None`` skips the demonstrations (pure RL); their value is then None.
    """
    ds = _read(path)
    if len(ds) == 0:
        raise DataError(f"data.path={path!r} holds no records")
    fields = [(prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")]
    if demo_key is not None:
        fields.append((demo_key, "data.demo_key"))
    for key, option in fields:  # all names first: one run reports a wrong key at once
        _check_column(ds, key, option, path)
    prompts = _check_field(ds, prompt_key, "data.prompt_key", path)
    answers = _check_field(ds, answer_key, "data.answer_key", path)
    demos = (_check_field(ds, demo_key, "data.demo_key", path) if demo_key is not None
             else [None] * len(prompts))
    return [{"index": i, "prompt": p, "demonstration": d, "answer": a}
            for i, (p, d, a) in enumerate(zip(prompts, demos, answers))]
