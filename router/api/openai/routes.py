"""OpenAI's routes: each translates its request into the one Ask, and errors into its shape."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from functions import PROMPT_BACKENDS
from router.api.common import (
    AudioResponse,
    family_route,
    is_elevenlabs_client,
    log,
    request_caller,
    speech_service,
)
from router.api.openai.schemas import OPENAI_FORMATS, SpeechBody, VoiceRef, openai_error
from router.errors import ChorusError
from router.speech import Ask, SpeechService, model_voices
from router.voices import Caller

router = APIRouter(route_class=family_route(openai_error, validation_status=400), tags=["OpenAI"])


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@router.post("/v1/audio/speech", summary="Create speech (OpenAI)")
async def create_speech(
    body: SpeechBody, service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller)
) -> StreamingResponse:
    job = service.prepare(Ask(
        text=body.input,
        text_param="input",
        model=body.model,
        family="openai",
        voice=body.voice.id if isinstance(body.voice, VoiceRef) else body.voice,
        speed=body.speed,
        instructions=body.instructions,
        caller=caller,
    ))
    stream = await service.audio(job, OPENAI_FORMATS[body.response_format])
    if body.stream_format == "audio":
        return AudioResponse(stream)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for data in stream:
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        except ChorusError as exc:
            yield _event({"type": "error", "error": {"message": exc.message, "code": exc.code}})
            return
        except Exception:
            # The status line is long gone: the event is the only way left to tell the client.
            log.exception("speech stream failed")
            yield _event({"type": "error", "error": {"message": "synthesis failed", "code": "synthesis_failed"}})
            return
        tokens = len(body.input.split())
        yield _event(
            {
                "type": "speech.audio.done",
                "usage": {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens},
            }
        )

    return AudioResponse(stream, events(), media_type="text/event-stream")


@router.get("/v1/models", summary="List models (OpenAI shape; ElevenLabs shape for its clients)")
async def list_models(request: Request, service: SpeechService = Depends(speech_service)):
    configs = service.registry.all()
    # Both APIs own GET /v1/models with different shapes; ElevenLabs clients say who they are.
    if is_elevenlabs_client(request.headers):
        return [
            {
                "model_id": config.name,
                "name": config.name,
                "can_do_text_to_speech": True,
                "languages": [{"language_id": config.parameters.language, "name": config.parameters.language}]
                if config.parameters.language
                else [],
            }
            for config in configs
        ]
    # A config's aliases are listed too: some clients check their fixed model name is there.
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": f"chorus-{config.backend}"}
            for config in configs
            for name in (config.name, *config.aliases)
        ],
    }


@router.get("/v1/audio/models", summary="List speech models (as Open WebUI asks for them)")
async def list_speech_models(service: SpeechService = Depends(speech_service)):
    # Models that speak text: a sound-generation prompt model is no voice for a chat app.
    return {"models": [{"id": config.name} for config in service.registry.all()
                       if config.backend not in PROMPT_BACKENDS]}


@router.get("/v1/audio/voices", summary="List voices per model")
async def list_voices(service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller)):
    saved = service.voices.all(caller)
    listing = await model_voices(service, saved)
    names = {voice.id: voice.name for voice in saved}
    return {
        "voices": [
            {"id": voice, "name": names.get(voice, voice), "model": model, "confirmed": voices.confirmed}
            for model, voices in listing.items()
            for voice in voices.names
        ]
    }
