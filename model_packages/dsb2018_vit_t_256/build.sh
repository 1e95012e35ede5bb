#!/usr/bin/env bash
# Train the DSB2018 demo model from random initialisation (usam_bioimageio.training.recipe, issue 13) and write
# its compact file (int8 weights per output channel) model_packages/dsb2018_vit_t_256/vit_t_256_dsb2018.pt.
# vit_t (MobileSAM architecture) at input size 256, seed 0, on the DSB2018 `train` split of
# ../shared/data/dsb2018/splits.json; the first 16 `val` images select the checkpoint (best.pt).
#   stage 1 (--stage ais): image encoder + µSAM's AIS decoder, dense supervision (torch_em's Dice-based distance
#           loss) with flips / rot90, the decoder on the whole frame (a block of it, --ais-crop, trains its
#           instance and batch norms on other statistics than the whole frame gives at inference: measured, the
#           block-trained decoder marks background as foreground on whole frames).
#   stage 1b (--encoder-batchnorm frozen): stage 1 continued from its best.pt with the encoder's BatchNorm on
#           fixed running statistics (set once at the start), the normalisation inference uses: stage 1 trains
#           them on each image's own statistics (a batch of one), and its encoder lost ~40 % of its validation
#           loss when run with running statistics (measured: 0.278 -> 0.457 at step 4000).
#   stage 2 (--stage prompts): prompt encoder + mask decoder on stage 1b's best encoder (frozen), µSAM's iterative
#           prompting (point / box, then corrective points), class-balanced BCE + µSAM's Dice (--mask-dice 1: the
#           balanced BCE starts the untrained decoder, the Dice term rewards whole-object overlap) + IoU MSE.
#   Every stage trains on 256 x 256 crops of the images enlarged SCALE=2 times (--scale; µSAM's 1024 frame shows
#   DSB2018 nuclei enlarged 2-4x, and its UNETR draws each 16 x 16 block from one embedding cell: at native size
#   the foreground was what limited AIS, measured in the model README), so the model runs on images enlarged
#   2x (`usam ais --scale 2`). Stages 1 and 1b keep best.pt by the AIS mSA of the centre crops of 16 `val`
#   images at that scale (--val-msa), stage 1 with the encoder's BatchNorm recalibrated before each validation.
#   Stage 2 trains half its samples in the runtime's frame (--frame-prob 0.5: the whole image resized to 256,
#   where `usam segment` prompts an untiled image) and validates there; the other half are 2x crops.
# float32 throughout: --bf16 (bfloat16 autocast) made steps 1.65x faster on a CPU with bf16 instructions, but this
# machine has AVX2 only, where torch emulates bf16 (measured: ~60 s per stage-1 step at scale 2; float32 ~3.3 s).
# Rerunning continues each stage exactly from its latest.pt (checkpoints every 250 / 125 / 50 steps), so an interrupted
# build is resumed by running it again (with the same THREADS: the result depends on torch's thread count).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${USAM_DATA:-../shared/data}
OUT=${OUT:-out/dsb2018_vit_t_256}
# run 3's schedule: ~2.3 h on this machine's 2 cores (stage 1 ~3.3 s per step, 1b the same, prompts ~2.2 s), more
# than one working session: it resumes where the last one stopped while out/ is kept. Stage 1 went to 1000 steps,
# then 1500 (its validation was still rising); stage prompts, flat for 500 steps on stage 1's 1000-step encoder,
# gets 1000 (run 2's broke out after ~300 steps on a 5000-step encoder).
STEPS_AIS=${STEPS_AIS:-1500}
STEPS_AIS_BN=${STEPS_AIS_BN:-250}
STEPS_PROMPTS=${STEPS_PROMPTS:-1000}
SCALE=${SCALE:-2}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
resume() { if [ -f "$1/latest.pt" ]; then echo "$1/latest.pt"; else echo "$2"; fi; }
COMMON=(--data "$DATA/dsb2018" --val-limit 16 --model-type vit_t --image-size 256 --seed 0 --threads "$THREADS"
        --device "$DEVICE" --no-progress --scale "$SCALE")
AIS_FROM=$(resume "$OUT/ais" "")
.venv/bin/usam train "${COMMON[@]}" --stage ais --output "$OUT/ais" ${AIS_FROM:+--checkpoint "$AIS_FROM"} \
  --steps "$STEPS_AIS" --lr 3e-4 --warmup 50 --ais-min-size 5 --val-msa --checkpoint-every 250 --val-every 250
.venv/bin/usam train "${COMMON[@]}" --stage ais --output "$OUT/ais_frozen_bn" \
  --checkpoint "$(resume "$OUT/ais_frozen_bn" "$OUT/ais/best.pt")" --encoder-batchnorm frozen \
  --steps "$STEPS_AIS_BN" --lr 3e-4 --warmup 50 --ais-min-size 5 --val-msa --checkpoint-every 125 --val-every 125
.venv/bin/usam train "${COMMON[@]}" --stage prompts --output "$OUT/prompts" \
  --checkpoint "$(resume "$OUT/prompts" "$OUT/ais_frozen_bn/best.pt")" \
  --steps "$STEPS_PROMPTS" --frame-prob 0.5 --lr 5e-4 --warmup 50 --n-objects 16 --n-iterations 3 --mask-dice 1 --checkpoint-every 50 \
  --val-every 50
.venv/bin/python scripts/compact_checkpoint.py "$OUT/prompts/best.pt" model_packages/dsb2018_vit_t_256/vit_t_256_dsb2018.pt \
  --pixel-scale "$SCALE"  # the packages record it (config.usam.pixel_scale): `usam ais` runs the model at it
