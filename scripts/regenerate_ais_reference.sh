#!/usr/bin/env bash
# Regenerate tests/data/ais_reference/*.npz: µSAM's own automatic-instance-segmentation (AIS)
# post-processing run on maps made from real ground-truth labels (see scripts/ais_reference.py).
#
# usage: scripts/regenerate_ais_reference.sh [VENV_DIR] [OUT_DIR]
#   VENV_DIR  reference virtual environment to create / reuse (default /tmp/usam-ais-ref)
#   OUT_DIR   where the fixtures go (default tests/data/ais_reference)
#   DECODER_OUT  environment variable: where scripts/ais_decoder_reference.py writes its fixture
#             (default tests/data/ais_decoder_reference)
#   PYTHON    environment variable: interpreter for the venv (default python3, needs >= 3.11 for micro-sam)
#   TORCH_SPEC  environment variable: torch requirement (default "torch==2.13.0"; machines of this
#             project have that CPU build locally, elsewhere any torch >= 2.5 that pip finds works)
#
# The venv is scripts/micro_sam_venv.sh's (micro-sam 1.8.14 and what it imports); the post-processing under
# test never calls torchvision (it is imported at module level only), so a stub stands in where none imports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/usam-ais-ref}
OUT=${2:-tests/data/ais_reference}

bash scripts/micro_sam_venv.sh "$VENV"

"$VENV/bin/python" scripts/ais_reference.py "$OUT"
# µSAM's AIS decoder maps (UNETR through micro_sam, seeded vit_t weights) -> tests/data/ais_decoder_reference
"$VENV/bin/python" scripts/ais_decoder_reference.py "${DECODER_OUT:-tests/data/ais_decoder_reference}"
# torch_em's AIS training targets (PerObjectDistanceTransform) of real label crops -> tests/data
"$VENV/bin/python" scripts/distance_targets_reference.py tests/data
