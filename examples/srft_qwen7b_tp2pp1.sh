#!/usr/bin/env bash
# SRFT on Qwen2.5-Math-7B: trainer TP2 PP1 (+ DP over the remaining trainer GPUs), SGLang
# rollout servers on their own GPUs, the paper's hyperparameters.
#
#   MODEL_DIR=/data/Qwen2.5-Math-7B DATA_PATH=/data/openr1_math_46k.parquet \
#   TRAIN_GPUS=4 ROLLOUT_GPUS=4 bash examples/srft_qwen7b_tp2pp1.sh [a.b=c ...]
#
# MODEL_DIR: a Hugging Face checkpoint directory; DATA_PATH: jsonl/parquet/arrow with
# prompt, demonstration and answer fields. Extra arguments are config overrides.
# The config raises the model's context from 4096 to 16384 positions with RoPE theta 40000
# (the paper's setting for Qwen2.5-Math-7B), so prompts of 1024 + responses of 8192 tokens fit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
die() { echo "srft_qwen7b_tp2pp1: $*" >&2; exit 2; }

: "${MODEL_DIR:?set MODEL_DIR to a Hugging Face Qwen2.5-Math-7B directory (config.json + *.safetensors)}"
: "${DATA_PATH:?set DATA_PATH to the training data (jsonl/parquet/arrow with prompt, demonstration, answer)}"
[[ -f "$MODEL_DIR/config.json" ]] || die "no config.json in MODEL_DIR=$MODEL_DIR (download Qwen/Qwen2.5-Math-7B there)"
ls "$MODEL_DIR"/*.safetensors >/dev/null 2>&1 || die "no *.safetensors weights in MODEL_DIR=$MODEL_DIR"
[[ -e "$DATA_PATH" ]] || die "DATA_PATH=$DATA_PATH does not exist"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[[ "$NGPU" -ge 4 ]] || die "needs CUDA GPUs: found $NGPU; the recipe needs >= 4 (2 trainer TP ranks + rollout servers). For a CPU run use examples/srft_tiny_cpu.sh"
ROLLOUT_GPUS=${ROLLOUT_GPUS:-$((NGPU / 2))}
TRAIN_GPUS=${TRAIN_GPUS:-$((NGPU - ROLLOUT_GPUS))}
(( TRAIN_GPUS % 2 == 0 )) || die "TRAIN_GPUS=$TRAIN_GPUS must be a multiple of TP=2"
(( ROLLOUT_GPUS >= 2 && ROLLOUT_GPUS % 2 == 0 )) || die "ROLLOUT_GPUS=$ROLLOUT_GPUS must be an even number >= 2 (SGLang TP2 per server)"
(( TRAIN_GPUS + ROLLOUT_GPUS <= NGPU )) || die "TRAIN_GPUS+ROLLOUT_GPUS=$((TRAIN_GPUS + ROLLOUT_GPUS)) > $NGPU GPUs"

# trainer ranks on the first TRAIN_GPUS devices, SGLang servers on the rest
export SRFT_ROLLOUT_GPUS=$(seq -s, "$TRAIN_GPUS" $((TRAIN_GPUS + ROLLOUT_GPUS - 1)))
export CUDA_DEVICE_MAX_CONNECTIONS=1
# srft-train checks the run (config, model, layout) before it starts the ranks under torchrun
exec "$PY" -m srft_mcore.training.cli --nproc-per-node "$TRAIN_GPUS" \
  --config "$ROOT/examples/configs/srft_qwen7b_tp2pp1.yaml" \
  model.hf_path="$MODEL_DIR" data.path="$DATA_PATH" rollout.num_servers=$((ROLLOUT_GPUS / 2)) "$@"
