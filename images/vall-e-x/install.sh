#!/usr/bin/env bash
# Builds the VALL-E X worker's environment: `install.sh <python of the target venv>`.
# The Dockerfile and the test suite (tests/envs.py) both run it, so they get the same packages.
set -euo pipefail
PY="$1"
cd "$(dirname "$0")"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first, and pinned from then on: otherwise a dependency's looser requirement lets pip
# replace it with a CUDA build several GB large. TORCH_SPEC picks another build (a GPU image
# can use torch==2.9.1 with torchaudio==2.9.1 and torchcodec==0.9.1).
pip_install "${TORCH_SPEC:-torch==2.13.0}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -W ignore -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

pip_install -c "$constraints" -r requirements.txt
# Their declared dependencies are replaced by requirements.txt (see there).
pip_install --no-deps tts-webui-valle-x==0.0.3 openai-whisper==20250625
# torchaudio.load goes through torchcodec. 0.13 is the last CPU-only release (later ones link
# CUDA); it needs FFmpeg's shared libraries from the system (Debian: libavcodec, libavformat,
# libavutil, libswresample, libswscale, libavdevice, libavfilter).
pip_install --no-deps "${TORCHCODEC_SPEC:-torchcodec==0.13.0}"

# PyPI's torchaudio is a CUDA build whose compiled ops do not match a newer CPU torch, and then
# `import torchaudio` fails. Without its compiled libraries it imports in pure-Python mode, which
# covers what EnCodec and Vocos use (resampling, mel spectrograms). Only done when the import
# actually fails.
if ! "$PY" -c 'import torchaudio' 2>/dev/null; then
    lib_dir="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')"
    rm -f "$lib_dir"/*.so
    "$PY" -c 'import torchaudio'
fi
