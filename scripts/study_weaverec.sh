#!/usr/bin/env bash
# The WeaveRec study of docs/results.md (SOURCE_A + SOURCE_B -> TARGET), on the CPU budget
# (experiment=[weaverec_amazon,weaverec_cpu]: the data caps of amazon_lora_cpu, so the per-domain LoRAs of
# the X-Cross study are this study's target-only row and the merges' inputs). For each seed:
#   - the per-domain LoRA of the target and both sources (scripts/study_xcross.sh's runs, archived under
#     results/xcross/; the target's is copied here as the target-only row);
#   - WeaveRec (a target LoRA and one hybrid LoRA a source, weave-trained, merged);
#   - joint training at equal epochs (2-3x target-only's optimizer steps) and at equal steps;
#   - the four merges of the stored LoRAs (task arithmetic, TIES, DARE-linear, DARE-TIES), each at the
#     scaling (and density) validation chooses from conf/method/merge_sources.yaml's grids.
# Each run is archived into results/weaverec/<run>/; a run already archived is skipped, so the script resumes.
# RUNS, EXTRA: scripts/study_lib.sh.
# usage: scripts/study_weaverec.sh TARGET SOURCE_A SOURCE_B [SEED ...]   (seeds default: 0 1 2)
# then:  python report.py results --page docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 a=$2 b=$3; shift 3
seeds=${*:-0 1 2}
source scripts/study_lib.sh
run() { study_run weaverec "$@"; }

for s in $seeds; do
  for d in "$target" "$a" "$b"; do  # the per-domain LoRAs: the X-Cross study's runs (skipped when archived)
    study_lora "$d" "$s"
  done
  study_reuse "xcross/lora-$target-s$s" "weaverec/lora-$target-s$s"  # the target-only row
  setting=("experiment=[weaverec_amazon,weaverec_cpu]" "data.target=$target" "data.sources=[$a,$b]" "seed=$s")
  run "weaverec-$target-s$s" "${setting[@]}"
  run "joint-epochs-$target-s$s" "${setting[@]}" method=joint
  run "joint-steps-$target-s$s" "${setting[@]}" method=joint method.module.steps=equal
  for rule in task_arithmetic ties dare_linear dare_ties; do  # train_missing: a fresh clone has no stored LoRAs
    run "merge-$rule-$target-s$s" "${setting[@]}" method=merge_sources "merge.rule=$rule" method.module.train_missing=true
  done
done
