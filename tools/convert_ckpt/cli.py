"""``srft-convert``: convert between HF and Megatron checkpoints.

  srft-convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M] [--dtype D] [--overwrite]
  srft-convert mcore-to-hf --ckpt DIR --out DIR [--dtype D] [--max-shard-size 5GB] [--overwrite]

Both stream tensor by tensor and write to a temporary directory that replaces ``--out``
only when the conversion succeeded. The last line printed is a JSON summary; errors print
one ``error: ...`` line and exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (e.g. 5GB, 500MB)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srft-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist_checkpointing")
    a.add_argument("--hf", required=True, help="HF model directory")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="ranks that share the work (TP)")
    a.add_argument("--pp", type=int, default=1, help="pipeline stages that share the work")
    a.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="stored dtype (default: the HF checkpoint's)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore-to-hf", help="Megatron dist_checkpointing -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="checkpoint written by hf-to-mcore")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: the original HF checkpoint's, else bfloat16)")
    b.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="largest safetensors shard (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from srft_mcore.models.name_map import BridgeError
    from srft_mcore.launching.local import RankFailed
    from srft_mcore.models import UnsupportedArchitecture
    from tools.convert_ckpt.hf_to_mcore import hf_to_mcore
    from tools.convert_ckpt.mcore_to_hf import CheckpointFormatError, mcore_to_hf
    from tools.convert_ckpt.outdir import OutputDirError

    try:
        if args.command == "hf-to-mcore":
            res = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                              overwrite=args.overwrite)
        else:
            res = mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite,
                              max_shard_bytes=args.max_shard_size)
    except (BridgeError, UnsupportedArchitecture, OutputDirError, CheckpointFormatError,
            FileNotFoundError, RankFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
