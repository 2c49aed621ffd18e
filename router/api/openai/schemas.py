"""OpenAI's speech API as it comes over the wire: its request body, its output formats and its
error shape."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from router.encoding import AudioFormat

OPENAI_FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("mp3"),
    "opus": AudioFormat("opus"),
    "aac": AudioFormat("aac"),
    "flac": AudioFormat("flac"),
    "wav": AudioFormat("wav"),
    # OpenAI documents raw pcm as 24 kHz 16-bit mono; clients rely on that rate.
    "pcm": AudioFormat("pcm", sample_rate=24000),
}


def openai_error(status: int, message: str, param: str | None, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


class VoiceRef(BaseModel):
    id: str


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str | VoiceRef
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
