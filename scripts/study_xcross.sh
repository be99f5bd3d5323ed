#!/usr/bin/env bash
# The X-Cross study of docs/results.md for one direction (SOURCE_A + SOURCE_B -> TARGET), on the CPU presets:
# for each seed, the per-domain LoRA of the target and of both sources (the target LoRA row, and the source
# adapters X-Cross fuses) and X-Cross (its zero_shot row is X-Cross at start: the fused model before
# training, the integrators and w at their initial values). Each run
# is archived into results/xcross/<run>/ (metrics, per-user ranks, resolved config); a run already archived
# is skipped, so the script resumes. Any plain-format domains work: EXTRA passes more overrides, e.g.
#   EXTRA="data.root=/my/domains data.collection=mine" scripts/study_xcross.sh shoes boots sandals 0
# usage: scripts/study_xcross.sh TARGET SOURCE_A SOURCE_B [SEED ...]   (seeds default: 0 1 2)
# then:  python report.py results --page docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 a=$2 b=$3; shift 3
seeds=${*:-0 1 2}
study=${STUDY:-xcross} runs=${RUNS:-outputs/study}
read -r -a extra <<< "${EXTRA:-}"

run() {  # run NAME ARGS...: train.py ARGS into $runs/$study/NAME, then archive it
  local name=$1; shift
  [ -f "results/$study/$name/metrics.json" ] && { echo "archived: results/$study/$name"; return; }
  python train.py "$@" "${extra[@]}" "hydra.run.dir=$runs/$study/$name"
  python -m recsys.evaluation.studies "$runs/$study/$name" "results/$study/$name"
}

for s in $seeds; do
  for d in "$target" "$a" "$b"; do
    run "lora-$d-s$s" experiment=amazon_lora_cpu "data.target=$d" "seed=$s"
  done
  run "xcross-$target-s$s" experiment=xcross_amazon_cpu "data.target=$target" "data.sources=[$a,$b]" "seed=$s"
done
