#!/usr/bin/env bash
# The main job on a fresh machine: set up, export the demo model trained here (model_packages/dsb2018_vit_t_256/,
# a vit_t at input size 256 with µSAM's AIS decoder; when its weights file is absent, as on a fresh clone until
# the model is final, a seeded random vit_t at 256, said on stderr), segment a DSB2018 test image from box
# prompts (boxes of its ground-truth objects) and automatically (AIS).
# Writes out/demo/: family/ (package zips + family.yaml), labels.tif + overlay.png (prompted),
# ais_labels.tif + ais_overlay.png (AIS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${USAM_DATA:-../shared/data}
ID=01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf  # first image of the DSB2018 test split
IMAGE=$DATA/dsb2018/images/$ID.png
LABELS=$DATA/dsb2018/labels/$ID.tif
MODEL=model_packages/dsb2018_vit_t_256/vit_t_256_dsb2018.pt
OUT=out/demo
export USAM_CACHE_DIR=${USAM_CACHE_DIR:-$PWD/.cache/usam}
if [ -f "$MODEL" ]; then
  NAME=usam_dsb2018_vit_t_256
  .venv/bin/python scripts/demo_inputs.py --out "$OUT" --labels "$LABELS"
else  # the demo model's weights are not committed until it is final (model_packages/dsb2018_vit_t_256/README.md)
  echo "demo: $MODEL not found (build it with model_packages/dsb2018_vit_t_256/build.sh); exporting a SEEDED RANDOM vit_t instead: the pipeline is real, the masks are not meaningful" >&2
  MODEL=$OUT/vit_t_256_random.pt
  NAME=vit_t_256_random
  .venv/bin/python scripts/demo_inputs.py --out "$OUT" --labels "$LABELS" --random-checkpoint "$MODEL"
fi
.venv/bin/usam export "$MODEL" --out "$OUT/family" --name "$NAME" \
  --sample-image "$IMAGE" --sample-labels "$LABELS" --overwrite
# prompts and AIS encode the image themselves: at the model's pixel scale (config.usam.pixel_scale), tiled where the
# enlarged image exceeds the model's input size (embeddings of the image as it is, `usam embed`, fit scale 1 only)
.venv/bin/usam segment --model "$OUT/family" --image "$IMAGE" --prompts "$OUT/prompts.json" --tile-shape auto \
  --out "$OUT/labels.tif" --overlay "$OUT/overlay.png" --overwrite
# AIS thresholds: the ones chosen by grid search on DSB2018 `val` (model_packages/dsb2018_vit_t_256/report/)
.venv/bin/usam ais --model "$OUT/family" --image "$IMAGE" --tile-shape auto \
  --center-distance-threshold 0.6 --boundary-distance-threshold 0.7 --distance-smoothing 1.2 \
  --out "$OUT/ais_labels.tif" --overlay "$OUT/ais_overlay.png" --overwrite
