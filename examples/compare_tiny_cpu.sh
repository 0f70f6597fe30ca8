#!/usr/bin/env bash
# The paper's comparison on the embedded demo (examples/configs/srft_tiny_cpu.yaml): SFT, GRPO,
# SFT->RL, LUFFY, SRFT and the two SRFT ablations, 3 seeds each, then srft-eval of every final
# policy on the held-out id/ood splits, a mean +- std table and curves. Every run is one
# trainer launch (TP2 on 2 gloo ranks + one SGLang CPU server), so the full grid takes hours on
# 2 cores; re-running the same command skips finished runs and resumes interrupted ones.
# Extra arguments go to srft-compare (options, then a.b.c=value overrides), e.g.
#   bash examples/compare_tiny_cpu.sh --methods srft grpo sft_rl --seeds 1 --steps 20
#   bash examples/compare_tiny_cpu.sh --dry-run
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || { echo "compare_tiny_cpu: $PY not found; run: bash scripts/setup_env.sh" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
cd "$ROOT"
# one fixed directory (OUT=... for another), so that a second invocation continues the first
exec "$PY" -m srft_mcore.comparison --config examples/configs/srft_tiny_cpu.yaml \
  --out "${OUT:-runs/compare_tiny_cpu}" "$@"
