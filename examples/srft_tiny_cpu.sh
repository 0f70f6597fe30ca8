#!/usr/bin/env bash
# The whole SRFT loop on a laptop CPU: trainer TP2 (2 gloo ranks) + one SGLang CPU server,
# the embedded tiny model and arithmetic task. Extra arguments are config overrides, e.g.
#   bash examples/srft_tiny_cpu.sh train.steps=10 logging.run_dir=runs/try
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || { echo "srft_tiny_cpu: $PY not found; run: bash scripts/setup_env.sh" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
cd "$ROOT"
# a new run directory each time, unless one is given (logging.run_dir=...; add --resume to continue)
set -- "logging.run_dir=runs/srft_tiny_cpu/$(date +%Y%m%d-%H%M%S)" "$@"
# srft-train checks the run, then starts 2 ranks under torchrun
"$PY" -m srft_mcore.training.cli --nproc-per-node 2 --config examples/configs/srft_tiny_cpu.yaml "$@"
RUN_DIR=$("$PY" - "$@" <<'PY'
import sys
from srft_mcore.config import load_config
overrides = [a for a in sys.argv[1:] if not a.startswith("--")]
print(load_config("examples/configs/srft_tiny_cpu.yaml", overrides).logging.run_dir)
PY
)
"$PY" -m srft_mcore.training.plot "$RUN_DIR" >/dev/null
echo "run directory: $RUN_DIR (metrics.jsonl, plots/, tensorboard/, checkpoints/, hf_final/)"
