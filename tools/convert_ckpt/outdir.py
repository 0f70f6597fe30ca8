"""Atomic output directories and the non-weight files that travel with a checkpoint."""
from __future__ import annotations

import contextlib
import os
import shutil

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5",
                   ".safetensors.index.json", ".bin.index.json")


class OutputDirError(ValueError):
    pass


def check_output_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"output {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OutputDirError(f"output directory {out!r} is not empty; pass --overwrite to "
                             f"replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool):
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is
    removed, so a half-written conversion never appears under ``out``."""
    check_output_dir(out, overwrite)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(out):
        old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def copy_side_files(src: str, dst: str) -> list:
    """Copy config, generation config, tokenizer and chat-template files (no weights)."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied
