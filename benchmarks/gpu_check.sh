#!/usr/bin/env bash
# One-command GPU check of the trainer (bf16 Megatron-Core on CUDA, local layer spec): the
# tests marked gpu, then benchmarks/gpu_bench.py; a few minutes on one H100 or H200.
#
#   bash benchmarks/gpu_check.sh
#
# stdout: one JSON object (device, versions, pytest counts and the failures' names, the
# tests' figures, the benchmark, total seconds); progress and failures go to stderr.
# Writes the JSON (and the full log) to $OUT when OUT is set, and a copy to commit under
# benchmarks/results/<date>_<device>.json.
# Python: $PYTHON, else .venv/bin/python, else python3. When megatron-core does not import
# and .whl/ exists (scripts/fetch_gpu_wheels.sh), its wheels are installed into a temporary
# directory first.
# Exit status: 0 everything passed; 1 a test or a benchmark section failed; 2 no CUDA.
# SRFT_GPU_DRY_RUN=1 runs the same steps on CPU at toy sizes, to check this script on a
# machine without a GPU (figures meaningless, nothing written under benchmarks/results).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
START=$SECONDS
DRY=${SRFT_GPU_DRY_RUN:-0}
PYTEST_TIMEOUT=${GPU_CHECK_PYTEST_TIMEOUT:-270}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-150}
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
say() { echo "[gpu_check] $*" >&2; }

if [[ $DRY != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device visible to torch ($PY); this check needs a GPU" >&2
  exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# megatron-core (and any other missing package) from carried wheels
if [[ -d .whl ]] && ! "$PY" -c 'import megatron.core' >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl 2>/dev/null | wc -l) wheels from .whl/"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl >&2 || say "wheel install failed"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# 1. the GPU tests (every test file with a gpu mark); in a dry run, test_gpu.py on CPU
if [[ $DRY == 1 ]]; then
  SELECT=(-k "not test_cpu_" tests/test_gpu.py)
else
  mapfile -t FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
  SELECT=(-m gpu "${FILES[@]}")
fi
say "pytest ${SELECT[*]} (limit ${PYTEST_TIMEOUT}s)"
SRFT_GPU_FIGURES=$WORK/figures.jsonl timeout --kill-after=10 "$PYTEST_TIMEOUT" \
  "$PY" -m pytest "${SELECT[@]}" -q -rfE -p no:cacheprovider --basetemp="$WORK/pytest" \
  --continue-on-collection-errors \
  --junitxml="$WORK/junit.xml" >"$WORK/pytest.log" 2>&1
PYTEST_RC=$?

# 2. the benchmark
BENCH_ARGS=(--out "$WORK/bench.json")
[[ $DRY == 1 ]] && BENCH_ARGS+=(--cpu-smoke)
say "benchmarks/gpu_bench.py ${BENCH_ARGS[*]} (limit ${BENCH_TIMEOUT}s)"
timeout --kill-after=10 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}" \
  >/dev/null 2>"$WORK/bench.log"
BENCH_RC=$?

# 3. one JSON object
"$PY" -W ignore - "$WORK" "$PYTEST_RC" "$BENCH_RC" "$((SECONDS - START))" "$DRY" \
  >"$WORK/check.json" <<'PY'
import datetime
import glob
import json
import os
import platform
import re
import sys
import xml.etree.ElementTree as ET

work, pytest_rc, bench_rc, seconds, dry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5] == "1"


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def version(name):
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment():
    import torch

    dev = {"name": "cpu (dry run)"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = {"name": p.name, "count": torch.cuda.device_count(),
               "memory_gib": round(p.total_memory / 2**30, 1),
               "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
    try:
        import megatron.core  # noqa: F401
        mcore = version("megatron-core") or "imported (version unknown)"
    except Exception as e:  # noqa: BLE001 - reported
        mcore = f"does not import: {type(e).__name__}: {e}"
    return dev, {"python": platform.python_version(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "megatron_core": mcore,
                 "transformers": version("transformers"),
                 "transformer_engine": version("transformer_engine"), "apex": version("apex")}


def pytest_summary():
    out = {"exit_status": pytest_rc}
    try:
        root = ET.parse(os.path.join(work, "junit.xml")).getroot()
    except (OSError, ET.ParseError):
        out["error"] = ("pytest did not finish (timed out)" if pytest_rc in (124, 137)
                        else "pytest wrote no report")
        out["log_tail"] = tail(os.path.join(work, "pytest.log"))
        return out
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, seconds_by_test = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        seconds_by_test[name] = round(float(case.get("time", 0)), 2)
        for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                counts[key] += 1
                if key != "skipped":
                    message = (found.get("message") or "").strip().splitlines()
                    failures.append({"test": name, "kind": key,
                                     "message": message[0][:300] if message else ""})
                break
        else:
            counts["passed"] += 1
    if pytest_rc == 5:
        out["error"] = "no tests were collected"
    return dict(out, **counts, failures=failures, seconds_by_test=seconds_by_test)


def figures():
    merged = {}
    try:
        with open(os.path.join(work, "figures.jsonl")) as f:
            for line in f:
                merged.update(json.loads(line))
    except OSError:
        pass
    return merged


def benchmark():
    try:
        with open(os.path.join(work, "bench.json")) as f:
            bench = json.load(f)
        bench.pop("raw_bytes", None)
        return bench
    except (OSError, ValueError):
        return {"error": f"gpu_bench.py gave no result (exit status {bench_rc})",
                "failed": ["all"], "log_tail": tail(os.path.join(work, "bench.log"))}


device, versions = environment()
tests, bench = pytest_summary(), benchmark()
ok = pytest_rc == 0 and bench_rc == 0
date = datetime.date.today().isoformat()
slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
report = {"check": "srft_mcore benchmarks/gpu_check.sh", "date": date, "dry_run": dry,
          "ok": ok, "device": device, "versions": versions,
          "wheels": sorted(os.path.basename(p) for p in glob.glob(".whl/*.whl")),
          "pytest": tests, "figures": figures(), "benchmark": bench,
          "result_file": None if dry else f"benchmarks/results/{date}_{slug}.json",
          "total_seconds": seconds}
print(json.dumps(report, indent=1))
PY
ASSEMBLE_RC=$?

STATUS=0
(( PYTEST_RC != 0 || BENCH_RC != 0 || ASSEMBLE_RC != 0 )) && STATUS=1
if (( STATUS != 0 )); then  # what broke, for whoever reads the output's tail
  grep -E "^(FAILED|ERROR) " "$WORK/pytest.log" | head -20 >&2
  (( BENCH_RC != 0 )) && tail -5 "$WORK/bench.log" >&2
fi
cat "$WORK/check.json"
RESULT=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["result_file"] or "")' \
  "$WORK/check.json" 2>/dev/null)
if [[ -n $RESULT ]]; then
  mkdir -p "$(dirname "$RESULT")" && cp "$WORK/check.json" "$RESULT" && say "wrote $RESULT"
fi
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  cp "$WORK/check.json" "$OUT/gpu_check.json"
  cat "$WORK/pytest.log" "$WORK/bench.log" >"$OUT/gpu_check.log" 2>/dev/null
fi
exit $STATUS
