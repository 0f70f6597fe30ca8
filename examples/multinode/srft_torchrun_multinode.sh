#!/usr/bin/env bash
# One trainer node of a multi-node run: start it on every trainer node with the same values
# but NODE_RANK (0 on the MASTER_ADDR node, whose rank 0 talks to the SGLang servers).
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 \
#   CONFIG=examples/configs/recipes/qwen2.5-32b.yaml \
#   bash examples/multinode/srft_torchrun_multinode.sh model.hf_path=/data/Qwen2.5-32B \
#     data.path=/data/train.parquet 'rollout.urls=["http://node2:30000","http://node3:30000"]'
#
# MASTER_ADDR, NNODES, NODE_RANK (else SLURM_PROCID, as under srun with one task per node)
#   and CONFIG are required; MASTER_PORT defaults to 29500, GPUS_PER_NODE to 8.
# Arguments are config overrides (a.b=c) and --resume. SGLang servers on other nodes are
#   given by URL (rollout.urls, started by examples/multinode/sglang_node.sh or by hand); they
#   dial this node for the weight sync at rollout.sync_address (auto: the interface that
#   reaches them; export SRFT_SYNC_ADDR=<this node's address> to choose it per node).
# The run is checked first (srft-train --check). DRY_RUN=1 prints the command instead of
# running it. PYTHON: the interpreter (python).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
die() { echo "srft_torchrun_multinode: $*" >&2; exit 2; }

: "${MASTER_ADDR:?set MASTER_ADDR to the address of the NODE_RANK=0 node}"
: "${NNODES:?set NNODES to the number of trainer nodes}"
: "${CONFIG:?set CONFIG to the run config (e.g. examples/configs/recipes/qwen2.5-32b.yaml)}"
NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-}}
[[ -n "$NODE_RANK" ]] || die "set NODE_RANK (0 .. NNODES-1) for this node"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
for v in NNODES NODE_RANK MASTER_PORT GPUS_PER_NODE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v=${!v} is not a non-negative integer"
done
(( NNODES >= 1 && GPUS_PER_NODE >= 1 )) || die "NNODES and GPUS_PER_NODE must be >= 1"
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
[[ -f "$CONFIG" || -f "$ROOT/$CONFIG" ]] || die "CONFIG=$CONFIG does not exist"
[[ -f "$CONFIG" ]] || CONFIG=$ROOT/$CONFIG

export CUDA_DEVICE_MAX_CONNECTIONS=1
# static rendezvous: node_rank fixes which node holds global rank 0 (the one on MASTER_ADDR)
cmd=("$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
     --nproc_per_node="$GPUS_PER_NODE" --rdzv_backend=static
     --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
     -m srft_mcore.training --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
# bad input ends here in one paragraph (exit 2), not in a traceback from torchrun
"$PY" -m srft_mcore.training.cli --check --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --config "$CONFIG" "$@" || exit
exec "${cmd[@]}"
