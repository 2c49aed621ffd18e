#!/usr/bin/env bash
# Builds the Parler-TTS worker's environment: `install.sh <python of the target venv>`.
# The Dockerfile and the test suite (tests/envs.py) both run it, so they get the same packages.
set -euo pipefail
PY="$1"
cd "$(dirname "$0")"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first, and pinned from then on: otherwise pip may replace it with a CUDA build several
# GB large. TORCH_SPEC picks another build (a GPU image can use torch==2.9.1 with
# TORCHAUDIO_SPEC=torchaudio==2.9.1, a matched pair).
pip_install ${TORCH_SPEC:-torch==2.13.0}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

pip_install -c "$constraints" ${TORCHAUDIO_SPEC:-torchaudio==2.11.0}
pip_install -c "$constraints" -r requirements.txt

# PyPI's torchaudio is a CUDA build whose compiled ops do not match a newer CPU torch, and then
# `import torchaudio` fails. Without its compiled libraries it imports in pure-Python mode, which
# is all Parler-TTS needs (its audio codec only imports it). Only done when the import fails.
if ! "$PY" -c 'import torchaudio' 2>/dev/null; then
    lib_dir="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')"
    rm -f "$lib_dir"/*.so
    "$PY" -c 'import torchaudio'
fi
