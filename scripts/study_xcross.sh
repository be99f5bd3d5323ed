#!/usr/bin/env bash
# The X-Cross study of docs/results.md for one direction (SOURCE_A + SOURCE_B -> TARGET), on the CPU presets:
# for each seed, the per-domain LoRA of the target and of both sources (the target LoRA row, and the source
# adapters X-Cross fuses) and X-Cross (its zero_shot row is X-Cross at start: the fused model before
# training, the integrators and w at their initial values). Each run
# is archived into results/xcross/<run>/ (metrics, per-user ranks, resolved config); a run already archived
# is skipped, so the script resumes. Any plain-format domains work (RUNS, EXTRA: scripts/study_lib.sh).
# usage: scripts/study_xcross.sh TARGET SOURCE_A SOURCE_B [SEED ...]   (seeds default: 0 1 2)
# then:  python report.py results --page docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 a=$2 b=$3; shift 3
seeds=${*:-0 1 2}
source scripts/study_lib.sh

for s in $seeds; do
  for d in "$target" "$a" "$b"; do
    study_lora "$d" "$s"
  done
  study_run xcross "xcross-$target-s$s" experiment=xcross_amazon_cpu "data.target=$target" "data.sources=[$a,$b]" "seed=$s"
done
