#!/usr/bin/env bash
# Download the wheels that a GPU machine without a package registry lacks into .whl/
# (CPython 3.12, manylinux x86_64); benchmarks/gpu_check.sh installs them there.
#
#   bash scripts/fetch_gpu_wheels.sh [NAME ...]      (default: megatron-core)
#
# Versions come from requirements/gpu.txt (else requirements/constraints.txt). The check
# needs only megatron-core: its requirements (torch, numpy, packaging) are on such machines,
# and the code the GPU tests run imports neither datasets, math-verify nor SGLang. Older
# wheels of the same packages are removed first (two versions of one package stop the
# install). PYTHON selects the Python whose pip downloads (default python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.whl
PY=${PYTHON:-python3}
NAMES=("$@")
(( ${#NAMES[@]} )) || NAMES=(megatron-core)

pin_of() {  # NAME -> NAME==VERSION from the pin files
  local name=$1 line
  for file in "$ROOT/requirements/gpu.txt" "$ROOT/requirements/constraints.txt"; do
    [[ -f $file ]] || continue
    line=$(grep -iE "^${name}==[^ ]+" "$file" | head -1 || true)
    if [[ -n $line ]]; then echo "${line%%[[:space:]#]*}"; return; fi
  done
  echo "fetch_gpu_wheels: no pin for $name in requirements/gpu.txt or constraints.txt" >&2
  exit 1
}

mkdir -p "$DEST"
PINS=()
for name in "${NAMES[@]}"; do
  PINS+=("$(pin_of "$name")")
  stem=$(echo "$name" | tr '-' '_')
  rm -f "$DEST/${stem}"-*.whl "$DEST/${name}"-*.whl
done
echo "[fetch_gpu_wheels] ${PINS[*]} -> $DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
ls -l "$DEST"/*.whl
echo "[fetch_gpu_wheels] $(du -sm "$DEST" | cut -f1) MiB in $DEST"
