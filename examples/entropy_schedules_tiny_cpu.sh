#!/usr/bin/env bash
# The paper's open question on entropy control, on the embedded task with the comparison's
# protocol (examples/compare_tiny_cpu.sh: lr chosen on the validation split from a grid of
# three with seed 1, then seeds 2 and 3 at that lr, paired seeds, the compute ledger): SRFT
# with the paper's weights (exp) against moving-average weights (ema, halflife 5 steps), the
# two-timescale variant (ema2, 2 and 10 steps), an entropy target (target: the first step's
# entropy, the start policy's on the training prompts, held there) and fixed weights
# (w_SFT = w_RL = 1). Writes benchmarks/results/entropy_schedules_tiny_cpu.json and
# docs/figures/entropy_schedules_tiny_cpu_*.png. Extra arguments go to srft-compare.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=entropy_schedules_tiny_cpu exec bash "$HERE/compare_tiny_cpu.sh" \
  --methods srft srft_ema srft_ema2 srft_target srft_fixed \
  --variant srft_ema=srft srft_ema.algorithm.weight_schedule=ema \
  srft_ema.algorithm.entropy_ema_halflife=5 \
  --variant srft_ema2=srft srft_ema2.algorithm.weight_schedule=ema2 \
  srft_ema2.algorithm.entropy_ema_halflife=2 srft_ema2.algorithm.entropy_ema_slow_halflife=10 \
  --variant srft_target=srft srft_target.algorithm.weight_schedule=target \
  --variant srft_fixed=srft srft_fixed.algorithm.weight_schedule=fixed \
  "$@"
