"""The voice library's layout on the models volume, as the router writes it (router/voices.py)
and the cloning backends read it: each saved voice a folder `voices/<id>/` holding its reference
recording (mono 16-bit WAV) and its details (JSON), beside which a backend may keep what it
derived from the recording."""

from __future__ import annotations

import json
import re
from pathlib import Path

REFERENCE_FILE = "reference.wav"
DETAILS_FILE = "voice.json"
#: A saved voice's recording, as a request names it (router/voices.py's Voice.reference).
_REFERENCE = re.compile(rf"voices/[0-9a-f]{{20}}/{re.escape(REFERENCE_FILE)}")


def saved_voice_missing(models_dir: Path, voice: str | None) -> bool:
    """Whether `voice` names a saved voice's recording that `models_dir` does not hold: on a
    volume whose changes a host sees only once it reloads (Modal's), the one case to reload for."""
    return bool(voice) and _REFERENCE.fullmatch(voice) is not None and not (models_dir / voice).is_file()


def saved_voice_details(reference: Path) -> dict | None:
    """The details of the saved voice whose recording is `reference`; None for any other file
    (a config's own speaker WAV, which is not the library's to write beside)."""
    if reference.name != REFERENCE_FILE:
        return None
    try:
        details = json.loads(reference.with_name(DETAILS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return details if isinstance(details, dict) else None
