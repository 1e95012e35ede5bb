#!/usr/bin/env bash
# Train the DSB2018 demo model from scratch and write its compact file (int8 weights per output channel)
# model_packages/dsb2018_vit_t/vit_t_dsb2018.pt. Data: the DSB2018 `train` split (451 images) of
# ../shared/data/dsb2018/splits.json; validation: the first 4 images of its `val` split. µSAM's joint training
# of a randomly initialised vit_t (torch seed 0): encoder, prompt decoder and AIS decoder, with the CPU settings
# (one optimiser step on the sum of both losses, AIS loss on 24 x 24 blocks of embedding cells).
# EPOCHS=9 (the run of 2026-11-21, ~33 min on 2 cores) is too short: see README.md here.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${USAM_DATA:-../shared/data}
OUT=${OUT:-out/dsb2018_vit_t}
EPOCHS=${EPOCHS:-9}
.venv/bin/usam train --data "$DATA/dsb2018" --val-limit 4 --output "$OUT/training" --model-type vit_t \
  --train-encoder --joint-step --n-objects 4 --n-iterations 3 --ais-crop 24 --ais-min-size 5 --lr 2e-4 \
  --epochs "$EPOCHS" --steps-per-epoch 15 --seed 0 --device cpu
.venv/bin/python scripts/compact_checkpoint.py "$OUT/training/latest.pt" model_packages/dsb2018_vit_t/vit_t_dsb2018.pt
