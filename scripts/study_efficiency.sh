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
runs=${RUNS:-outputs/study}
read -r -a extra <<< "${EXTRA:-}"

archive() {  # archive RUN_FOLDER NAME
  [ -f "results/efficiency/$2/metrics.json" ] || python -m recsys.evaluation.studies "$1" "results/efficiency/$2"
}

for s in $seeds; do
  STUDY=xcross scripts/study_xcross.sh "$target" "$a" "$b" "$s"
  archive "$runs/xcross/lora-$target-s$s" "lora-f1.0-$target-s$s"
  archive "$runs/xcross/xcross-$target-s$s" "xcross-f1.0-$target-s$s"
  for f in 0.25 0.5 0.75; do
    for m in lora xcross; do
      name="$m-f$f-$target-s$s"
      [ -f "results/efficiency/$name/metrics.json" ] && continue
      if [ "$m" = lora ]; then set -- experiment=amazon_lora_cpu "data.target=$target"
      else set -- experiment=xcross_amazon_cpu "data.target=$target" "data.sources=[$a,$b]"; fi
      python train.py "$@" "seed=$s" "data.target_fraction=$f" data.cap_scales_with_fraction=true \
        export_adapter=false zero_shot=false "${extra[@]}" "hydra.run.dir=$runs/efficiency/$name"
      archive "$runs/efficiency/$name" "$name"
    done
  done
done
