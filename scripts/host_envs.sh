#!/usr/bin/env bash
# Install the host runtimes of the host-conformance check (scripts/host_check.sh), each in a clean
# environment without this project: python venvs per ONNX Runtime / bioimageio.core release, Debian's
# torch 1.13, and ONNX Runtime 1.13.1 native through npm's onnxruntime-node (deepImageJ's release).
# Environments are cached under $USAM_HOSTS_DIR (default ~/.cache/usam-bioimageio/hosts) and reused
# while their requirements are unchanged. Environments install side by side (pip and npm wait on downloads and
# disk as much as on the CPU); each one's output goes to $HOSTS_DIR/NAME.log, shown when it fails.
# Usage: host_envs.sh [--quick] [NAME ...]  (default: all)
#   --quick: the profile of CI's check (host_check.py --quick), where bioimageio.core runs only the ONNX
#            weights: its environments without torch (each torch install costs ~40 s and 1 GB)
set -euo pipefail
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
HOSTS_DIR=${USAM_HOSTS_DIR:-$HOME/.cache/usam-bioimageio/hosts}
PY=${PYTHON:-python3}
mkdir -p "$HOSTS_DIR"

# name -> pip requirements (one venv each). ORT < 1.20 wheels are built against numpy 1.x.
declare -A PIP_ENVS=(
  [ort-1.15.1]="onnxruntime==1.15.1 numpy<2"
  [ort-1.16.3]="onnxruntime==1.16.3 numpy<2"
  [ort-1.20.1]="onnxruntime==1.20.1 numpy<2.3"
  [ort-newest]="onnxruntime numpy"
  [torch-pinned]="torch==2.13.0 numpy"
  # BioEngine's bioimageio.core; bioimageio.spec 0.5.10.x breaks with pydantic 2.14
  [core-0.10.4]="bioimageio.core==0.10.4 pydantic<2.14 onnxruntime torch==2.13.0"
  [core-newest]="bioimageio.core bioimageio.spec pydantic<2.14 onnxruntime torch==2.13.0"
  # the newest bioimageio.spec alone (bioimageio.core pins an older one): descriptions only
  [spec-newest]="bioimageio.spec pydantic<2.14"
)
if [ "$QUICK" = 1 ]; then  # host_check.py's QUICK_RUNTIMES
  QUICK_SKIP=" ort-1.16.3 ort-1.20.1 "
  PIP_ENVS[core-0.10.4]="bioimageio.core==0.10.4 pydantic<2.14 onnxruntime"
  PIP_ENVS[core-newest]="bioimageio.core bioimageio.spec pydantic<2.14 onnxruntime"
fi
ALL=(ort-1.13.1 ort-1.15.1 ort-1.16.3 ort-1.20.1 ort-newest torch-1.13 torch-pinned core-0.10.4 core-newest
     spec-newest)

ready() {  # an environment is ready when its stamp holds its requirements
  [ -f "$HOSTS_DIR/$1/.ready" ] && [ "$(cat "$HOSTS_DIR/$1/.ready")" = "$2" ]
}

install_pip() {
  local name=$1 reqs=${PIP_ENVS[$1]} dir=$HOSTS_DIR/$1
  ready "$name" "$reqs" && return 0
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install -q $reqs
  echo "$reqs" > "$dir/.ready"
}

install_ort_node() {  # ONNX Runtime 1.13.1, the native library, as onnxruntime-node ships it
  local dir=$HOSTS_DIR/ort-1.13.1 reqs="onnxruntime-node@1.13.1"
  ready ort-1.13.1 "$reqs" && return 0
  command -v npm >/dev/null || { echo "host_envs: ort-1.13.1 needs node and npm" >&2; return 1; }
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$dir" && npm install --silent --no-audit --no-fund "$reqs" >/dev/null)
  echo "$reqs" > "$dir/.ready"
}

install_debian_torch() {  # torch 1.13 as Debian ships it, with Debian's python and numpy; OpenBLAS as the
  # BLAS (Debian's default reference BLAS makes its matmuls ~20x slower; a Debian host installs OpenBLAS too)
  local dir=$HOSTS_DIR/torch-1.13 debs="python3-torch libopenblas0-pthread"
  # shellcheck disable=SC2086
  if ! dpkg -s $debs >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs >/dev/null; }
  fi
  mkdir -p "$dir"
  ln -sf /usr/bin/python3 "$dir/python"
  echo "$debs" > "$dir/.ready"
}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for name in "${ALL[@]}"; do [[ "${QUICK_SKIP:- }" == *" $name "* ]] || names+=("$name"); done
fi
pids=()
for name in "${names[@]}"; do
  case $name in
    ort-1.13.1) install=install_ort_node ;;
    torch-1.13) install=install_debian_torch ;;
    *)
      [ -n "${PIP_ENVS[$name]+x}" ] || { echo "host_envs: unknown environment $name" >&2; exit 2; }
      install="install_pip $name" ;;
  esac
  $install > "$HOSTS_DIR/$name.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=1
    echo "host_envs: ${names[$i]} could not be installed:" >&2
    tail -n 20 "$HOSTS_DIR/${names[$i]}.log" >&2
  fi
done
exit $failed
