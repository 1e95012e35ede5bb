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
# What it installs (all from PyPI; no conda needed since micro-sam 1.8 replaced vigra / nifty with
# bioimage-cpp): micro-sam 1.8.14, torch-em 0.10.9, python-elf 0.9.2 without their GUI / training
# dependencies (napari, PyQt6, trackastra, ...), bioimage-cpp 0.9.0 and the scientific stack they
# import. torchvision is installed when a build that matches the installed torch imports; a CPU-only
# torch has none (torchvision's wheel links libtorch_cuda), and then ais_reference.py puts a stub in its
# place: the post-processing under test never calls torchvision (it is imported at module level only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/usam-ais-ref}
OUT=${2:-tests/data/ais_reference}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
# The packages under test, pinned, without their heavy (GUI / training) dependencies.
"${PIP[@]}" --no-deps "micro-sam==1.8.14" "torch-em==0.10.9" "python-elf==0.9.2" "segment-anything==1.0" \
  "mobilesam-mirror==1.0.0"  # vit_t, for scripts/ais_decoder_reference.py
# What importing micro_sam.instance_segmentation (-> micro_sam.util, torch_em, elf) needs.
"${PIP[@]}" "bioimage-cpp==0.9.0" numpy scipy scikit-image scikit-learn zarr imageio tifffile pooch \
  xxhash tqdm h5py matplotlib requests imagecodecs kornia pandas

# torchvision: only if a build matching the installed torch imports.
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  TV=$("$VENV/bin/python" - <<'EOF'
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print(f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision")
EOF
)
  "${PIP[@]}" --no-deps "$TV" || true
  if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "note: torchvision does not import with this torch; ais_reference.py stubs it (unused by AIS)."
    "$VENV/bin/python" -m pip uninstall -q -y torchvision || true
  fi
fi

"$VENV/bin/python" scripts/ais_reference.py "$OUT"
# µSAM's AIS decoder maps (UNETR through micro_sam, seeded vit_t weights) -> tests/data/ais_decoder_reference
"$VENV/bin/python" scripts/ais_decoder_reference.py "${DECODER_OUT:-tests/data/ais_decoder_reference}"
# torch_em's AIS training targets (PerObjectDistanceTransform) of real label crops -> tests/data
"$VENV/bin/python" scripts/distance_targets_reference.py tests/data
