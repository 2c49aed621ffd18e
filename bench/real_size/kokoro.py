"""Kokoro-82M at its published sizes with random weights, exported to ONNX as kokoro-onnx's release
was (bench/kokoro_model.py builds it, in a virtual environment with torch, before this runs in
Kokoro's image, which has none)."""

from __future__ import annotations

from pathlib import Path

SOURCE = ("hexgrad/Kokoro-82M config.json (sizes in bench/kokoro_model.py), exported to ONNX at opset 17 as "
          "kokoro-onnx's script does: 81.8 M parameters, 325 MB")
FOLDER = "kokoro-82m"
REQUEST = {"voice": "af_heart"}


def build(models_dir: Path) -> dict:
    model = models_dir / FOLDER / "kokoro-v1.0.onnx"
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run bench/kokoro_model.py {models_dir / FOLDER} first")
    return {"name": "kokoro-82m", "backend": "kokoro", "parameters": {"model": f"{FOLDER}/kokoro-v1.0.onnx"}}


def fix_length(backend, tokens: int) -> None:
    """Kokoro's length follows the text's phonemes and its predicted durations; random weights
    predict durations of their own, so the audio length is what run.py measures it to be."""

