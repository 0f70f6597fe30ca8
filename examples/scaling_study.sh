#!/usr/bin/env bash
# A scaling study: the same data, steps and evaluation for several model sizes, one trainer
# run per recipe (one after the other, on this node), then one table: model, layout, step
# time, tokens/s, peak memory and held-out accuracy (python -m srft_mcore.planning.scaling_table).
#
#   MODELS="qwen2.5-0.5b=/data/Qwen2.5-0.5B qwen2.5-1.5b=/data/Qwen2.5-1.5B qwen2.5-7b=/data/Qwen2.5-7B" \
#   DATA_PATH=/data/openr1.parquet EVAL_SPLITS="math500=/data/MATH500.jsonl aime24=/data/aime24.parquet" \
#   STEPS=100 OUT=runs/scaling bash examples/scaling_study.sh [--dry-run] [a.b=c ...]
#
#   CPU=1 bash examples/scaling_study.sh [--dry-run] [a.b=c ...]
#       the embedded tiny model and task at TP1 (1 rank) and TP2 (2 ranks) on CPU
#
# MODELS: RECIPE=MODEL_DIR entries; RECIPE is a name in examples/configs/recipes/ (e.g.
#   qwen2.5-7b) or a YAML file; MODEL_DIR the Hugging Face checkpoint it trains.
# Shared by every run: DATA_PATH (data.path), STEPS (train.steps), EVAL_SPLITS (NAME=FILE
#   entries: eval.splits), EVAL_EVERY (eval.every, default STEPS: the start and the end),
#   EVAL_LIMIT (eval.limit), and the a.b=c arguments (given last, so they win).
# OUT (runs/scaling): run NAME goes to OUT/NAME. Resumable: a run that finished (OUT/NAME/DONE)
#   is skipped, one that did not is resumed from its last checkpoint; delete OUT/NAME to redo it.
# GPUS_PER_NODE (default: the GPUs torch sees; 8 in a dry run without any): a recipe planned
#   for more GPUs is skipped with the reason; run it with examples/multinode/srft_slurm.sbatch
#   (logging.run_dir=OUT/NAME) and it joins the table.
# --dry-run: print the commands, run nothing. PYTHON: the interpreter (.venv's when present).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python
else PY=python; fi
die() { echo "scaling_study: $*" >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $arg (options: --dry-run; config overrides are a.b=c)" ;;
    *=*) EXTRA+=("$arg") ;;
    *) die "argument '$arg' is neither --dry-run nor a config override a.b=c" ;;
  esac
done
cd "$ROOT"
OUT=${OUT:-runs/scaling}

# ---------------------------------------------------------------- the runs
NAMES=(); CONFIGS=(); RUN_ARGS=(); NPROCS=()   # NPROCS: ranks, or empty (from the recipe)
if [[ "${CPU:-0}" == 1 ]]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
  STEPS=${STEPS:-20}
  EVAL_LIMIT=${EVAL_LIMIT:-50}
  for tp in 1 2; do   # gloo ranks; the SGLang server needs no GPU
    NAMES+=("tiny-tp$tp"); CONFIGS+=(examples/configs/srft_tiny_cpu.yaml)
    RUN_ARGS+=("parallel.tp=$tp model.hf_path=null"); NPROCS+=("$tp")
  done
else
  : "${MODELS:?set MODELS to RECIPE=MODEL_DIR entries (e.g. qwen2.5-7b=/data/Qwen2.5-7B), or CPU=1 for the embedded tiny model}"
  : "${DATA_PATH:?set DATA_PATH to the training data (jsonl/parquet/arrow with prompt, demonstration, answer)}"
  : "${STEPS:?set STEPS (train.steps of every run)}"
  : "${EVAL_SPLITS:?set EVAL_SPLITS to NAME=FILE held-out sets (e.g. math500=/data/MATH500.jsonl)}"
  for entry in $MODELS; do
    [[ "$entry" == *=* ]] || die "MODELS entry '$entry' is not RECIPE=MODEL_DIR"
    recipe=${entry%%=*}; model=${entry#*=}
    if [[ "$recipe" == *.yaml || "$recipe" == *.yml ]]; then config=$recipe
    else config=examples/configs/recipes/$recipe.yaml; fi
    [[ -f "$config" ]] || die "no recipe $config (names: $(ls examples/configs/recipes | sed 's/\.yaml$//' | tr '\n' ' '))"
    [[ "$DRY_RUN" == 1 || -f "$model/config.json" ]] || die "MODEL_DIR=$model (for $recipe) has no config.json"
    name=$(basename "$config"); name=${name%.y*ml}
    NAMES+=("$name"); CONFIGS+=("$config"); RUN_ARGS+=("model.hf_path=$model"); NPROCS+=("")
  done
fi
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -ge 1 ]] || die "STEPS=$STEPS must be a positive integer"

SHARED=("train.steps=$STEPS" "eval.every=${EVAL_EVERY:-$STEPS}" "checkpoint.every=${CHECKPOINT_EVERY:-$STEPS}")
[[ -n "${DATA_PATH:-}" ]] && SHARED+=("data.path=$DATA_PATH")
[[ -n "${EVAL_LIMIT:-}" ]] && SHARED+=("eval.limit=$EVAL_LIMIT")
if [[ -n "${EVAL_SPLITS:-}" ]]; then
  splits=""
  for entry in $EVAL_SPLITS; do
    [[ "$entry" == *=* ]] || die "EVAL_SPLITS entry '$entry' is not NAME=FILE"
    splits+="${splits:+, }\"${entry%%=*}\": \"${entry#*=}\""
  done
  SHARED+=("eval.splits={$splits}")
fi

if [[ "${CPU:-0}" != 1 && -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [[ "$GPUS_PER_NODE" == 0 ]]; then
    [[ "$DRY_RUN" == 1 ]] || die "no CUDA GPU found; CPU=1 runs the embedded tiny model on CPU"
    GPUS_PER_NODE=8
  fi
fi

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

# ---------------------------------------------------------------- one run after the other
DIRS=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}; config=${CONFIGS[$i]}; dir=$OUT/$name
  DIRS+=("$dir")
  read -r -a own <<< "${RUN_ARGS[$i]}"
  overrides=("${own[@]}" "${SHARED[@]}" "logging.run_dir=$dir" "${EXTRA[@]}")
  if [[ -f "$dir/DONE" ]]; then
    echo "# $name: finished ($dir/DONE), skipped"
    continue
  fi
  if [[ -n "${NPROCS[$i]}" ]]; then
    NPROC_PER_NODE=${NPROCS[$i]}; LOCAL_ROLLOUT_GPUS=""
  elif ! plan=$("$PY" -m srft_mcore.launching.multinode plan --config "$config" --nodes "$(hostname -s)" \
                  --gpus-per-node "$GPUS_PER_NODE" "${overrides[@]}" 2>&1); then
    echo "# $name: skipped, it does not fit one node of $GPUS_PER_NODE GPUs: ${plan#multinode: }"
    continue
  else
    eval "$plan"
  fi
  resume=()
  [[ -d "$dir" ]] && resume=(--resume)
  env_prefix=()
  [[ -n "$LOCAL_ROLLOUT_GPUS" ]] && env_prefix=(env "SRFT_ROLLOUT_GPUS=$LOCAL_ROLLOUT_GPUS")
  # srft-train checks the run, then starts the ranks under torchrun
  cmd=("${env_prefix[@]}" "$PY" -m srft_mcore.training.cli "--nproc_per_node=$NPROC_PER_NODE"
       --config "$config" "${resume[@]}" "${overrides[@]}")
  echo "# $name: $NPROC_PER_NODE trainer rank(s)${LOCAL_ROLLOUT_GPUS:+, SGLang on GPUs $LOCAL_ROLLOUT_GPUS} -> $dir"
  if [[ "$DRY_RUN" == 1 ]]; then
    show "${cmd[@]}"
    continue
  fi
  CUDA_DEVICE_MAX_CONNECTIONS=1 "${cmd[@]}" || die "$name failed (exit $?); rerun to resume it"
  touch "$dir/DONE"
done

# ---------------------------------------------------------------- the table
table=("$PY" -m srft_mcore.planning.scaling_table "${DIRS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  show "${table[@]}"
  exit 0
fi
mkdir -p "$OUT"
"${table[@]}" | tee "$OUT/scaling_table.md"
echo "table: $OUT/scaling_table.md"
