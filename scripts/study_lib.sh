# Shared by the study scripts (scripts/study_*.sh): source it after `cd` to the project folder.
# RUNS: where run folders go (default outputs/study); EXTRA: more train.py overrides for every run, e.g.
#   EXTRA="data.root=/my/domains data.collection=mine" scripts/study_xcross.sh shoes boots sandals 0
runs=${RUNS:-outputs/study}
read -r -a extra <<< "${EXTRA:-}"

study_run() {  # study_run STUDY NAME ARGS...: train.py ARGS into $runs/STUDY/NAME, archived into results/STUDY/NAME
  local study=$1 name=$2; shift 2
  [ -f "results/$study/$name/metrics.json" ] && { echo "archived: results/$study/$name"; return; }
  python train.py "$@" "${extra[@]}" "hydra.run.dir=$runs/$study/$name"
  python -m recsys.evaluation.studies "$runs/$study/$name" "results/$study/$name"
}

study_lora() {  # study_lora DOMAIN SEED: the per-domain LoRA (a target-LoRA row, a source adapter), results/xcross/
  study_run xcross "lora-$1-s$2" experiment=amazon_lora_cpu "data.target=$1" "seed=$2"
}

study_reuse() {  # study_reuse FROM TO: another study's archived run (results/FROM) as a run of this one (results/TO)
  [ -d "results/$2" ] || { mkdir -p "$(dirname "results/$2")" && cp -r "results/$1" "results/$2"; }
}
