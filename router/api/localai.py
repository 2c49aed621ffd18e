"""LocalAI's text-to-speech API: POST /tts."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from router.api.common import AudioResponse, family_route, speech_service
from router.encoding import AudioFormat
from router.speech import SpeechService

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


router = APIRouter(route_class=family_route(localai_error, validation_status=400), tags=["LocalAI"])


class TTSBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str
    voice: str | None = None
    backend: str | None = None
    language: str | None = None
    response_format: str | None = None


@router.post("/tts", summary="Text to speech (LocalAI)")
async def tts(body: TTSBody, service: SpeechService = Depends(speech_service)) -> StreamingResponse:
    job = service.prepare(
        text=body.input,
        text_param="input",
        model=body.model,
        voice=body.voice,
        language=body.language,
        backend=body.backend,
        family="localai",
    )
    fmt = LOCALAI_FORMATS.get((body.response_format or "wav").lower(), LOCALAI_FORMATS["wav"])
    return AudioResponse(await service.audio(job, fmt))
