"""Coqui XTTS v2 as bench/real_size/coqui.py builds it, each chunk's audio streamed (`tts.stream`):
its first chunk is the first piece, which the `coqui` row's whole chunk is to be set against."""

from __future__ import annotations

from pathlib import Path

from bench.real_size import coqui

SOURCE = f"{coqui.SOURCE}; tts.stream: true"
REQUEST = coqui.REQUEST
fix_length = coqui.fix_length
parameters = coqui.parameters


def build(models_dir: Path) -> dict:
    return {**coqui.build(models_dir), "name": "xtts-v2-stream", "tts": {"stream": True}}
