#!/usr/bin/env bash
# Regenerate model_packages/dsb2018_vit_t/report/ from the shipped weights: export the packages (ONNX, gated by
# bioimageio.core) and evaluate them on DSB2018 (`usam evaluate`: AIS / AMG thresholds by grid search on the
# first LIMIT `val` images, everything scored on the first LIMIT `test` images).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${USAM_DATA:-../shared/data}
OUT=${OUT:-out/dsb2018_vit_t}
LIMIT=${LIMIT:-8}
ID=01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf  # first image of the DSB2018 test split
.venv/bin/usam export model_packages/dsb2018_vit_t/vit_t_dsb2018.pt --out "$OUT/family" --name usam_dsb2018_vit_t \
  --formats onnx --sample-image "$DATA/dsb2018/images/$ID.png" --sample-labels "$DATA/dsb2018/labels/$ID.tif" \
  --overwrite --quiet
.venv/bin/usam evaluate --model "$OUT/family" --data "$DATA/dsb2018" --out model_packages/dsb2018_vit_t/report \
  --limit "$LIMIT" --title "usam_dsb2018_vit_t (demo model trained here) on DSB2018"
