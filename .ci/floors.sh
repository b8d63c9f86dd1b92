#!/usr/bin/env bash
# The fast tests at the lowest versions pyproject.toml allows (.ci/floors.py), in a virtual environment of their
# own outside the repository, removed afterwards; nothing is written into the repository.
#   bash .ci/floors.sh               every floor but torch's, with the CPU build of torch 2.13.0 (install: ~4 min here)
#   bash .ci/floors.sh torch-floor   torch's floor too: PyPI has it only as a CUDA build (with its nvidia-*
#                                    packages about 4 GB to fetch, 7 GB installed, 8-9 minutes here); it runs on a CPU
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
instead=(--instead torch==2.13.0)
[ "${1:-}" = torch-floor ] && instead=()
floors=$(mktemp -d)
trap 'rm -rf "$floors"' EXIT
python3 -m venv "$floors/venv"
"$floors/venv/bin/python" -m pip install -q --no-cache-dir $(python3 "$repo/.ci/floors.py" dev serve "${instead[@]}")
"$floors/venv/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|lightning|hydra-core|omegaconf|numpy) " | tr -s ' ' | paste -sd ';'
cd "$floors"
PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 "$floors/venv/bin/python" -m pytest -q -p no:cacheprovider \
    -c "$repo/pyproject.toml" --rootdir "$repo" -m "not slow" "$repo/tests"
