"""Start-up time of the command-line entry points; prints one JSON object.

Each command runs ``--repeat`` times in a fresh interpreter (best wall time kept), next to
the baseline of a bare ``python -c pass`` measured in the same process, so the figures read
as ratios on any machine. ``torch`` says whether the command's process imported torch.

    python benchmarks/cli_startup.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import sys, atexit; atexit.register(lambda: print('TORCH', 'torch' in sys.modules))\n"
COMMANDS = {
    "python -c pass (baseline)": "pass",
    "load_config + validate": ("from srft_mcore.config import load_config, validate\n"
                               "validate(load_config(None, []))"),
    "srft-plan --help": "import sys; sys.argv = ['srft-plan', '--help']\n"
                        "from srft_mcore.planning.cli import main; main()",
    "srft-eval --help": "import sys; sys.argv = ['srft-eval', '--help']\n"
                        "from srft_mcore.evaluation.cli import main; main()",
    "srft-train --help": "import sys; sys.argv = ['srft-train', '--help']\n"
                         "from srft_mcore.training.cli import main; main()",
    "srft-doctor --help": "import sys; sys.argv = ['srft-doctor', '--help']\n"
                          "from srft_mcore.doctor.cli import main; main()",
}


def best_of(code: str, repeat: int) -> tuple[float, bool]:
    best, torch_loaded = float("inf"), False
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE + code], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
        best = min(best, time.perf_counter() - t0)
        torch_loaded = "TORCH True" in out.stdout
    return best, torch_loaded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    seconds = {name: best_of(code, args.repeat) for name, code in COMMANDS.items()}
    base = seconds["python -c pass (baseline)"][0]
    out = {name: {"seconds": round(s, 3), "ratio_vs_bare_python": round(s / base, 1),
                  "torch": loaded} for name, (s, loaded) in seconds.items()}
    print(json.dumps({"repeat": args.repeat, "commands": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
