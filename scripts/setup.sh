#!/usr/bin/env bash
# Create .venv and install the project with every extra. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: a CPU build (2.13.0 is provided locally on these machines); installing it
# before anything else keeps pip from resolving a newer CUDA build with several GB of packages.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[torch,export,test]"
