"""An ASR that hears what Chorus says: Whisper tiny.en run by tests/asr/listen.py in the ASR's
own environment (.venv-asr: `make install-test` makes it from tests/asr/requirements.txt, so no
shipped image and not the project's environment carries it). One listener process serves the
session; `hear` hands it a batch of decoded clips and gets their transcripts back.

`word_error_rate` is the usual one: word substitutions, insertions and deletions against the
reference, over its word count, after lower-casing and dropping punctuation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.audio import Decoded, write_wav
from tests.processes import unavailable

REPO = Path(__file__).resolve().parents[1]
ASR_PYTHON = REPO / ".venv-asr" / "bin" / "python"
LISTENER = REPO / "tests" / "asr" / "listen.py"

#: Three Harvard sentences (IEEE 1969, list 1): 25 words, so one word misheard is 0.04.
HARVARD = ("The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. "
           "It is easy to tell the depth of a well.")
#: How much worse than the backend alone a route may be heard: one word in 25.
SLACK = 0.05


class Listener:
    """The ASR process: started once, fed batches of files, stopped at the end."""

    def __init__(self) -> None:
        if not ASR_PYTHON.exists():
            unavailable(f"no ASR environment at {ASR_PYTHON.parent.parent.name}/: `make install-test` makes it")
        self._folder = Path(tempfile.mkdtemp(prefix="chorus-asr-"))
        self._count = 0
        self._process = subprocess.Popen(
            [str(ASR_PYTHON), str(LISTENER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            # The ASR's own environment, not the test's (no PYTHONPATH into the repository).
            env={key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))},
        )
        if json.loads(self._read()) != {"ready": True}:
            raise RuntimeError("the ASR did not start")

    def _read(self) -> str:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the ASR exited with {self._process.wait()}")
        return line

    def hear(self, clips: dict[str, Decoded]) -> dict[str, str]:
        """Each clip's transcript, by the same key. The clips are written as 16-bit WAV at their
        decoded rate; the listener resamples them to Whisper's 16 kHz."""
        paths = []
        for clip in clips.values():
            self._count += 1
            path = self._folder / f"{self._count}.wav"
            write_wav(path, clip.samples, clip.sample_rate)
            paths.append(str(path))
        self._process.stdin.write(json.dumps(paths) + "\n")
        self._process.stdin.flush()
        return dict(zip(clips, json.loads(self._read()), strict=True))

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, heard: str) -> float:
    """(substitutions + deletions + insertions) / words of `reference`."""
    said, got = words(reference), words(heard)
    row = list(range(len(got) + 1))
    for i, word in enumerate(said, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(got, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / len(said)
