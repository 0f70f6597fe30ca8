#!/usr/bin/env bash
# How SRFT and SFT degrade with imperfect demonstrations, on the embedded task with the
# comparison's protocol (examples/compare_tiny_cpu.sh: lr chosen on the validation split from
# a grid of three with seed 1, then seeds 2 and 3 at that lr, paired seeds): each at
# data.demo_quality.wrong_fraction 0, 0.25 and 0.5 (a slip carried through the chain, the
# same corrupted demonstrations for every method: seeded by data.demo_quality.seed alone).
# Writes benchmarks/results/demo_quality_tiny_cpu.json and
# docs/figures/demo_quality_tiny_cpu_*.png. Extra arguments go to srft-compare.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=demo_quality_tiny_cpu exec bash "$HERE/compare_tiny_cpu.sh" \
  --methods srft sft srft_wrong25 sft_wrong25 srft_wrong50 sft_wrong50 \
  --variant srft_wrong25=srft srft_wrong25.data.demo_quality.wrong_fraction=0.25 \
  --variant sft_wrong25=sft sft_wrong25.data.demo_quality.wrong_fraction=0.25 \
  --variant srft_wrong50=srft srft_wrong50.data.demo_quality.wrong_fraction=0.5 \
  --variant sft_wrong50=sft sft_wrong50.data.demo_quality.wrong_fraction=0.5 \
  "$@"
