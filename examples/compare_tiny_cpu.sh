#!/usr/bin/env bash
# The paper's comparison on the embedded task, as an experiment: SFT, GRPO, SFT->RL, LUFFY,
# SRFT and the two SRFT ablations from the shipped base model (examples/configs/srft_tiny_cpu.yaml),
# each method's learning rate chosen on the validation split from a grid of three (seed 1),
# then seeds 2 and 3 at that lr; the demo's budget (40 steps x 8 prompts x the paper's group
# of 8 rollouts); one SGLang CPU server shared by every launch; strict scoring (a cut-off
# response scores 0). Writes OUT/table.md (mean ± 95 % interval over seeds, SRFT minus each
# method paired by seed, the compute ledger, the lr grid), OUT/results.json and OUT/plots/,
# then copies the per-run records to benchmarks/results/compare_tiny_cpu.json and the plots to
# docs/figures/compare_tiny_cpu_*.png. Re-running the same command skips finished runs.
# Extra arguments go to srft-compare (options, then a.b.c=value overrides), e.g.
#   bash examples/compare_tiny_cpu.sh --methods srft grpo --seeds 1 --dry-run
# NAME=... names the exported files instead (the studies built on this script set it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || { echo "compare_tiny_cpu: $PY not found; run: bash scripts/setup_env.sh" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
cd "$ROOT"
# one fixed directory (OUT=... for another), so that a second invocation continues the first
NAME=${NAME:-compare_tiny_cpu}
OUT=${OUT:-runs/$NAME}
set +e
"$PY" -m srft_mcore.comparison --config examples/configs/srft_tiny_cpu.yaml --out "$OUT" \
  --steps "${STEPS:-40}" --lr-grid ${LR_GRID:-1e-3 3e-3 1e-2} --seeds ${SEEDS:-1 2 3} \
  --shared-server --final-eval trainer \
  "$@" eval.at_start=false
rc=$?
set -e
if [[ -f "$OUT/results.json" && " $* " != *" --dry-run "* && -z "${NO_EXPORT:-}" ]]; then
  "$PY" - "$OUT" "$NAME" <<'PY'
import json, os, shutil, sys
out, name = sys.argv[1:3]
res = json.load(open(os.path.join(out, "results.json")))
keep = {k: res[k] for k in ("settings", "selection", "wall_seconds", "records", "methods")}
# paths relative to the repository root (the script runs there)
text = json.dumps(keep, indent=1, sort_keys=True).replace(os.getcwd() + os.sep, "")
with open(f"benchmarks/results/{name}.json", "w") as f:
    f.write(text + "\n")
for plot in os.listdir(os.path.join(out, "plots")):
    shutil.copy(os.path.join(out, "plots", plot), os.path.join("docs", "figures",
                                                               f"{name}_{plot}"))
print(f"wrote benchmarks/results/{name}.json and docs/figures/{name}_*.png")
PY
fi
exit $rc
