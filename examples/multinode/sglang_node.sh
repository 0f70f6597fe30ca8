#!/usr/bin/env bash
# The SGLang servers of one rollout node: SERVERS_PER_NODE servers of SERVER_TP GPUs each
# (server i on GPUs i*SERVER_TP .. and port SGLANG_PORT+i), with the flags the trainer gives
# the servers it launches itself (context length, RoPE overrides, dtype: from CONFIG). Runs
# until the servers exit or it is stopped (then it stops them).
#
#   CONFIG=examples/configs/recipes/qwen2.5-32b.yaml MODEL_DIR=/data/Qwen2.5-32B \
#   SERVERS_PER_NODE=1 bash examples/multinode/sglang_node.sh [a.b=c ...]
#
# SGLANG_HOST: the address the servers bind, which the trainer's rollout.urls name (default:
#   this node's host name; 0.0.0.0 binds every interface). SGLANG_PORT: 30000.
# SERVER_TP: rollout.server_tp of CONFIG unless set. LOG_DIR: the servers' logs (sglang_logs).
# ROUTER_PORT (optional): also start an sglang-router on this node at that port, in front of
#   ROUTER_WORKERS (every server URL of the run; the trainer then sets rollout.router_url).
# DRY_RUN=1 prints the commands instead. PYTHON: the interpreter (python).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
die() { echo "sglang_node: $*" >&2; exit 2; }

: "${CONFIG:?set CONFIG to the run config (the servers get its context length and dtype)}"
: "${MODEL_DIR:?set MODEL_DIR to the Hugging Face model directory the servers load}"
[[ -f "$CONFIG" ]] || CONFIG=$ROOT/$CONFIG
[[ -f "$CONFIG" ]] || die "CONFIG does not exist: $CONFIG"
SGLANG_HOST=${SGLANG_HOST:-$(hostname)}
SGLANG_PORT=${SGLANG_PORT:-30000}
SERVERS_PER_NODE=${SERVERS_PER_NODE:-1}
LOG_DIR=${LOG_DIR:-sglang_logs}
[[ "$SERVERS_PER_NODE" =~ ^[0-9]+$ ]] || die "SERVERS_PER_NODE=$SERVERS_PER_NODE is not a number"
tp_override=()
[[ -n "${SERVER_TP:-}" ]] && tp_override=("rollout.server_tp=$SERVER_TP")
# sets SERVER_TP (rollout.server_tp) and SERVER_ARGS (the server flags)
FLAGS=$("$PY" -m srft_mcore.launching.multinode server-args --shell --config "$CONFIG" \
        "model.hf_path=$MODEL_DIR" "$@" "${tp_override[@]}") \
  || die "cannot build the server flags from CONFIG=$CONFIG"
eval "$FLAGS"

cmds=()
for ((i = 0; i < SERVERS_PER_NODE; i++)); do
  gpus=$(seq -s, $((i * SERVER_TP)) $(((i + 1) * SERVER_TP - 1)))
  cmd=(env "CUDA_VISIBLE_DEVICES=$gpus" "$PY" -m sglang.launch_server --model-path "$MODEL_DIR"
       --host "$SGLANG_HOST" --port $((SGLANG_PORT + i)) "${SERVER_ARGS[@]}")
  cmds+=("$(printf '%q ' "${cmd[@]}")")
done
if [[ -n "${ROUTER_PORT:-}" ]]; then
  : "${ROUTER_WORKERS:?ROUTER_PORT needs ROUTER_WORKERS: the server URLs behind the router}"
  read -r -a workers <<< "$ROUTER_WORKERS"
  cmd=("$PY" -m sglang_router.launch_router --host "$SGLANG_HOST" --port "$ROUTER_PORT"
       --worker-urls "${workers[@]}" --policy "${ROUTER_POLICY:-cache_aware}"
       --prometheus-host "$SGLANG_HOST" --prometheus-port $((ROUTER_PORT + 1)))
  cmds+=("$(printf '%q ' "${cmd[@]}")")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s\n' "${cmds[@]}" | sed 's/ $//'
  exit 0
fi
mkdir -p "$LOG_DIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
node=$(hostname -s)
for k in "${!cmds[@]}"; do
  log=$LOG_DIR/sglang-$node-$k.log
  (( k == SERVERS_PER_NODE )) && log=$LOG_DIR/sglang-router-$node.log
  eval "${cmds[$k]}" > "$log" 2>&1 &
  pids+=($!)
  echo "sglang_node: started pid $! (log $log)"
done
wait -n "${pids[@]}"
die "a process exited (logs in $LOG_DIR); stopping the others"
