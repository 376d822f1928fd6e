#!/usr/bin/env bash
# The speed tables of docs/performance.md in one command:
#   benchmarks/bench_speed.sh /path/to/facebookresearch/DiT [extra sys.path dirs for timm ...]
# Each line below runs dits and the official code, each contender in its own process, alternated
# round by round, and prints medians and the ratio; the first adds --torch-info (the CPU model,
# ISA, torch / MKL / oneDNN versions, matmul peaks: what the figures depend on).
# Environment: QUICK=1 shortens the sampling runs (fewer steps);
# CLOCK=cpu times CPU seconds instead of wall time (for a busy machine; set OMP_NUM_THREADS=1).
set -euo pipefail
OFFICIAL=${1:?usage: $0 /path/to/DiT [extra sys.path dirs]}
shift
EXTRA=()
for p in "$@"; do EXTRA+=(--official-path "$p"); done
EXTRA+=(--clock "${CLOCK:-wall}")
SAMPLE_STEPS=${QUICK:+50}
DITS=${DITS:-dits}
INFO=(--torch-info)
for prec in fp32 bf16; do
  $DITS bench train --preset digits --precision $prec --official "$OFFICIAL" "${EXTRA[@]}" "${INFO[@]}"
  INFO=()
  $DITS bench train --model DiT-S/2 --image-size 32 --channels 3 --batch 8 --precision $prec --steps 2 --rounds 5 \
    --official "$OFFICIAL" "${EXTRA[@]}"
done
$DITS bench sample --preset digits --sample-steps "${SAMPLE_STEPS:-250}" --official "$OFFICIAL" "${EXTRA[@]}"
$DITS bench sample --model DiT-S/2 --image-size 32 --channels 3 --batch 4 --sample-steps 25 --official "$OFFICIAL" "${EXTRA[@]}"
