#!/usr/bin/env bash
# The data-efficiency study of docs/results.md (SOURCE_A + SOURCE_B -> TARGET): the target LoRA and X-Cross
# trained on 25, 50, 75 and 100% of the target's training users (data.target_fraction; the example cap
# scales with it, data.cap_scales_with_fraction=true), on the CPU presets. The 100% runs are the X-Cross
# study's (scripts/study_xcross.sh, run first: it also trains the source adapters); the others keep their
# adapters out of the store and skip the zero-shot row (it does not depend on the fraction). Each run is
# archived into results/efficiency/<run>/; archived runs are skipped. EXTRA: more overrides (see study_xcross.sh).
# usage: scripts/study_efficiency.sh TARGET SOURCE_A SOURCE_B [SEED ...]   (seeds default: 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 a=$2 b=$3; shift 3
seeds=${*:-0 1 2}
source scripts/study_lib.sh

for s in $seeds; do
  scripts/study_xcross.sh "$target" "$a" "$b" "$s"  # the 100% rows: the X-Cross study's archived runs
  for m in lora xcross; do
    study_reuse "xcross/$m-$target-s$s" "efficiency/$m-f1.0-$target-s$s"
  done
  for f in 0.25 0.5 0.75; do
    fraction=("seed=$s" "data.target_fraction=$f" data.cap_scales_with_fraction=true export_adapter=false zero_shot=false)
    study_run efficiency "lora-f$f-$target-s$s" experiment=amazon_lora_cpu "data.target=$target" "${fraction[@]}"
    study_run efficiency "xcross-f$f-$target-s$s" experiment=xcross_amazon_cpu "data.target=$target" \
      "data.sources=[$a,$b]" "${fraction[@]}"
  done
done
