#!/usr/bin/env bash
# Builds the Bark worker's environment: `install.sh <python of the target venv>`.
# The Dockerfile and the test suite (tests/envs.py) both run it, so they get the same packages.
set -euo pipefail
PY="$1"
cd "$(dirname "$0")"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first, and pinned from then on: otherwise pip may replace it with a CUDA build several
# GB large. TORCH_SPEC picks another build (a GPU image names a CUDA one).
pip_install ${TORCH_SPEC:-torch==2.13.0}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

pip_install -c "$constraints" -r requirements.txt
