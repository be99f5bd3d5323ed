#!/usr/bin/env bash
# The SASRec study of docs/results.md: the ID baseline (method=sasrec) with its current defaults on whole
# plain-format domains (every user, its own recipe: conf/recipe/sasrec.yaml, early stopping on validation),
# trained both ways on the same transitions (method.module.train_on): `last`, every leave-one-out prefix an
# example with the loss at its last position, and `sequence`, the paper's one example a user with the loss at
# every position (the default since this study). metrics.json records the training time and epochs
# (epochs/s) and the full-catalogue metrics beside the sampled ones. Each run is archived into results/sasrec/<run>/; a run
# already archived is skipped, so the script resumes. RUNS, EXTRA: scripts/study_lib.sh.
# usage: [SEEDS="0 1 2"] scripts/study_sasrec.sh DOMAIN [DOMAIN ...]   (seeds default: 0)
# then:  python report.py results --page docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: [SEEDS=\"0 1 2\"] scripts/study_sasrec.sh DOMAIN [DOMAIN ...]" >&2; exit 2; }
source scripts/study_lib.sh

for s in ${SEEDS:-0}; do
  for d in "$@"; do
    for train_on in last sequence; do
      study_run sasrec "sasrec-$train_on-$d-s$s" method=sasrec data=amazon "data.target=$d" "seed=$s" \
        "method.module.train_on=$train_on"
    done
  done
done
