"""LocalAI's /tts as it comes over the wire: its body, its output formats, its error shape."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from router.encoding import AudioFormat

# LocalAI's own mapping: its "pcm" is a WAV with a header, and anything it does not know
# (or nothing at all) is WAV. Its "opus" here is real Opus in Ogg.
LOCALAI_FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav"),
    "pcm": AudioFormat("wav"),
    "mp3": AudioFormat("mp3"),
    "opus": AudioFormat("opus"),
    "ogg": AudioFormat("opus"),
    "flac": AudioFormat("flac"),
    "aac": AudioFormat("aac"),
}


def localai_error(status: int, message: str, param: str | None, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": status, "message": message, "type": code}}, status_code=status
    )


#: How LocalAI's requests name a saved voice of its voice library.
PROFILE_URI = "localai://voice-profiles/"


def profile_voice(voice: str | None) -> str | None:
    """A voice as the library knows it: `localai://voice-profiles/<id>` is the profile's id."""
    return voice.removeprefix(PROFILE_URI) if voice else voice


class TTSBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str
    voice: str | None = None
    backend: str | None = None
    language: str | None = None
    response_format: str | None = None
