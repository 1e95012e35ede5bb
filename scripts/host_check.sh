#!/usr/bin/env bash
# Host-conformance check: install the host environments (cached), then run scripts/host_check.py with the
# project's venv. Arguments go to host_check.py (--family DIR, --runtimes ..., --report FILE, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
quick=()
for a in "$@"; do [ "$a" = --quick ] && quick=(--quick); done
bash scripts/host_envs.sh "${quick[@]}"
exec .venv/bin/python scripts/host_check.py "$@"
