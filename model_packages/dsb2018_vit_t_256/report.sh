#!/usr/bin/env bash
# Regenerate model_packages/dsb2018_vit_t_256/report/ from the shipped weights: export the package family (ONNX,
# gated by bioimageio.core) and benchmark it on DSB2018 (report.py: `usam evaluate`'s code with AIS / AMG
# thresholds by grid search on the first N_VAL `val` images, every method scored on the `test` split, plus the
# filled-box baseline; results.json holds issue 13's keys; AIS also on tiles of the images enlarged SCALE=2 times,
# the scale the model is trained at; AIS_WAYS="scaled" scores only that way, of "frame tiles scaled").
# LIMIT=N scores only the first N test images.
# Parts are cached in $OUT/report_parts with a fingerprint of the weights they depend on (see report.py);
# ONLY="ais ais_tiled ais_tiled_x2 baseline filled_box" computes just those (e.g. AIS on stage 1's weights while stage 2 trains).
# PARTIAL=1 with ONLY: write report/ from the parts there are, naming the missing ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${USAM_DATA:-../shared/data}
OUT=${OUT:-out/dsb2018_vit_t_256}
N_VAL=${N_VAL:-20}
HERE=model_packages/dsb2018_vit_t_256
CKPT=${CKPT:-$HERE/vit_t_256_dsb2018.pt}  # the shipped weights
FAMILY=${FAMILY:-$OUT/family}
ID=01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf  # first image of the DSB2018 test split
.venv/bin/usam export "$CKPT" --out "$FAMILY" --name usam_dsb2018_vit_t_256 \
  --formats onnx --sample-image "$DATA/dsb2018/images/$ID.png" --sample-labels "$DATA/dsb2018/labels/$ID.tif" \
  --overwrite --quiet
.venv/bin/python "$HERE/report.py" --checkpoint "$CKPT" --model "$FAMILY" --parts "$OUT/report_parts" --data "$DATA/dsb2018" --out "$HERE/report" \
  --n-val "$N_VAL" --scale "${SCALE:-2}" ${AIS_WAYS:+--ais-ways $AIS_WAYS} ${LIMIT:+--limit "$LIMIT" --limit-reason "${LIMIT_REASON:-the first $LIMIT}"} \
  --training "$OUT/ais" "$OUT/ais_frozen_bn" "$OUT/prompts" ${ONLY:+--only $ONLY} ${PARTIAL:+--partial}
