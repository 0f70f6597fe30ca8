#!/usr/bin/env bash
# Create (or refresh) the CPU development environment in .venv:
#   Python 3.11, torch 2.13.0 CPU, megatron-core 0.16.1, SGLang 0.5.19 (CPU recipe),
#   transformers, datasets, math-verify, ... and srft_mcore itself (editable).
# Every pin is in requirements/constraints.txt. Re-running is a no-op (seconds) unless the
# requirements, the constraints, the shims or setup.py changed.
# Usage: bash scripts/setup_env.sh [VENV_DIR]      (default: .venv in the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
C=$ROOT/requirements/constraints.txt
R=$ROOT/requirements/cpu.txt
SHIMS=$ROOT/shims/sglang_cpu
T0=$SECONDS
say() { echo "[setup_env] $*"; }

stamp_of() {
  cat "$C" "$R" "$ROOT/setup.py" "$SHIMS/srft_tv_shim.py" "$SHIMS/sgl_kernel/__init__.py" \
    "$0" | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp_of)
if [[ -f "$VENV/.srft_env_stamp" && "$(cat "$VENV/.srft_env_stamp")" == "$STAMP" ]] \
   && "$VENV/bin/python" -c "import srft_mcore, megatron.core, sglang" 2>/dev/null; then
  say "environment up to date: $VENV (${SECONDS}s)"
  exit 0
fi

command -v "$PY" >/dev/null || { echo "[setup_env] error: $PY not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "[setup_env] error: $PY is not Python 3.11 (megatron-core 0.16.1 and the pinned CPU torch need 3.11); set PYTHON=" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# 1) everything but sglang, one resolver pass under the single constraints file
"${PIP[@]}" install -q -c "$C" -r "$R"
say "dependencies installed ($((SECONDS - T0))s)"
# 2) sglang itself without its dependencies (its metadata pins a CUDA torch build)
"${PIP[@]}" install -q --no-deps -c "$C" sglang
# 3) the two CPU shims (see shims/sglang_cpu/README.md), copied into site-packages
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$SP/sgl_kernel"
cp -r "$SHIMS/sgl_kernel" "$SP/sgl_kernel"
cp "$SHIMS/srft_tv_shim.py" "$SP/srft_tv_shim.py"
echo "import srft_tv_shim" > "$SP/srft_tv_shim.pth"
# 4) the project itself
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
# 5) guard: a CPU torch and no CUDA runtime wheels
"$VENV/bin/python" -W ignore - <<'PY'
import importlib.metadata as md
import torch
assert torch.version.cuda is None, f"expected the CPU build of torch, got {torch.__version__}"
cuda = [d.metadata["Name"] for d in md.distributions()
        if d.metadata["Name"].lower().startswith(("nvidia-cu", "nvidia-nccl", "nvidia-cudnn"))]
assert not cuda, f"CUDA wheels were pulled in: {cuda}"
import megatron.core, sglang, transformers, datasets, math_verify, srft_mcore  # noqa: F401
print(f"[setup_env] torch {torch.__version__}, megatron-core {md.version('megatron-core')}, "
      f"sglang {md.version('sglang')}, transformers {md.version('transformers')}")
PY
echo "$STAMP" > "$VENV/.srft_env_stamp"
say "ready: $VENV ($(du -sm "$VENV" | cut -f1) MiB, $((SECONDS - T0))s)"
