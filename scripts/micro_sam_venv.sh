#!/usr/bin/env bash
# Create (or reuse) the micro-sam 1.8.14 reference venv that regenerates the fixtures micro-sam's own code
# makes (scripts/regenerate_ais_reference.sh, scripts/micro_sam_cache_fixture.py).
#
# usage: scripts/micro_sam_venv.sh [VENV_DIR]   (default /tmp/usam-ais-ref)
#   PYTHON, TORCH_SPEC: as in scripts/regenerate_ais_reference.sh
#
# What it installs (all from PyPI; no conda needed since micro-sam 1.8 replaced vigra / nifty with
# bioimage-cpp): micro-sam 1.8.14, torch-em 0.10.9, python-elf 0.9.2 without their GUI / training
# dependencies (napari, PyQt6, trackastra, ...), bioimage-cpp 0.9.0 and the scientific stack they
# import. torchvision is installed when a build that matches the installed torch imports; a CPU-only
# torch has none (torchvision's wheel links libtorch_cuda), and then the scripts put a stub in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/usam-ais-ref}
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
# What micro_sam.automatic_segmentation (its command, benchmarks/bench_folder.py) adds: torch_em's datasets.
"${PIP[@]}" natsort xarray

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
    echo "note: torchvision does not import with this torch; the scripts stub it (micro_sam_env.py)."
    "$VENV/bin/python" -m pip uninstall -q -y torchvision || true
  fi
fi

