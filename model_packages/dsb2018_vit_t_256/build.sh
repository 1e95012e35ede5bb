#!/usr/bin/env bash
# Train the DSB2018 demo model from random initialisation (usam_bioimageio.training.recipe, issue 13) and write
# its compact file (int8 weights per output channel) model_packages/dsb2018_vit_t_256/vit_t_256_dsb2018.pt.
# vit_t (MobileSAM architecture) at input size 256, seed 0, on the DSB2018 `train` split of
# ../shared/data/dsb2018/splits.json; the first 8 `val` images (centre crops) select the checkpoint (best.pt).
#   stage 1 (--stage ais): image encoder + µSAM's AIS decoder, dense supervision (torch_em's Dice-based distance
#           loss) on random 256 x 256 native-resolution crops with flips / rot90; the AIS decoder on a block of
#           8 x 8 embedding cells (128 x 128 pixels) around a random object pixel (its full-resolution layers cost).
#   stage 2 (--stage prompts): prompt encoder + mask decoder on stage 1's best encoder (frozen), µSAM's iterative
#           prompting (point / box, then corrective points), class-balanced BCE + IoU MSE.
# Rerunning continues each stage exactly from its latest.pt (checkpoints every 50 steps), so an interrupted
# build is resumed by running it again. One torch thread: on 2 shared cores, 2 threads were 2-4x slower.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${USAM_DATA:-../shared/data}
OUT=${OUT:-out/dsb2018_vit_t_256}
STEPS_AIS=${STEPS_AIS:-300}
STEPS_PROMPTS=${STEPS_PROMPTS:-350}
DEVICE=${DEVICE:-cpu}
resume() { if [ -f "$1/latest.pt" ]; then echo "$1/latest.pt"; else echo "$2"; fi; }
COMMON=(--data "$DATA/dsb2018" --val-limit 8 --model-type vit_t --image-size 256 --seed 0 --threads 1
        --device "$DEVICE" --checkpoint-every 50 --val-every 50 --no-progress)
AIS_FROM=$(resume "$OUT/ais" "")
.venv/bin/usam train "${COMMON[@]}" --stage ais --output "$OUT/ais" ${AIS_FROM:+--checkpoint "$AIS_FROM"} \
  --steps "$STEPS_AIS" --lr 1e-3 --warmup 50 --ais-crop 8 --ais-min-size 5
.venv/bin/usam train "${COMMON[@]}" --stage prompts --output "$OUT/prompts" \
  --checkpoint "$(resume "$OUT/prompts" "$OUT/ais/best.pt")" \
  --steps "$STEPS_PROMPTS" --lr 5e-4 --warmup 50 --n-objects 16 --n-iterations 3
.venv/bin/python scripts/compact_checkpoint.py "$OUT/prompts/best.pt" model_packages/dsb2018_vit_t_256/vit_t_256_dsb2018.pt
