"""LocalAI's route: its request translated into the one Ask, its errors into its shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from router.api.common import AudioResponse, family_route, speech_service
from router.api.localai.schemas import LOCALAI_FORMATS, TTSBody, localai_error
from router.speech import Ask, SpeechService

router = APIRouter(route_class=family_route(localai_error, validation_status=400), tags=["LocalAI"])


@router.post("/tts", summary="Text to speech (LocalAI)")
async def tts(body: TTSBody, service: SpeechService = Depends(speech_service)) -> StreamingResponse:
    job = service.prepare(Ask(
        text=body.input,
        text_param="input",
        model=body.model,
        family="localai",
        voice=body.voice,
        language=body.language,
        backend=body.backend,
    ))
    fmt = LOCALAI_FORMATS.get((body.response_format or "wav").lower(), LOCALAI_FORMATS["wav"])
    return AudioResponse(await service.audio(job, fmt))
