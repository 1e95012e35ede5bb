#!/usr/bin/env bash
# The main job on a fresh machine: set up, export a model family, segment a DSB2018 test image from prompts.
# Writes out/demo/: family/ (package zips + family.yaml), labels.tif, overlay.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${USAM_DATA:-../shared/data}
ID=01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf  # first image of the DSB2018 test split
IMAGE=$DATA/dsb2018/images/$ID.png
LABELS=$DATA/dsb2018/labels/$ID.tif
OUT=out/demo
export USAM_CACHE_DIR=${USAM_CACHE_DIR:-$PWD/.cache/usam}
.venv/bin/python scripts/demo_inputs.py --out "$OUT" --labels "$LABELS"
.venv/bin/usam export "$OUT/vit_t_random.pt" --out "$OUT/family" --name vit_t_random \
  --sample-image "$IMAGE" --sample-labels "$LABELS" --overwrite
.venv/bin/usam segment --model "$OUT/family" --image "$IMAGE" --prompts "$OUT/prompts.json" \
  --out "$OUT/labels.tif" --overlay "$OUT/overlay.png" --overwrite
