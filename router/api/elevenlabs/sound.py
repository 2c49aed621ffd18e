"""ElevenLabs' sound-effects API, POST /v1/sound-generation, as LocalAI serves it: the prompt goes
whole to a sound-generation model (MusicGen), `prompt_influence` is its guidance scale."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from functions import PROMPT_BACKENDS
from functions.config import ModelConfig
from router.api.common import AudioResponse, family_route, speech_service
from router.api.elevenlabs.schemas import DEFAULT_OUTPUT_FORMAT, elevenlabs_error, parse_output_format
from router.errors import InvalidRequest, ModelNotFound
from router.speech import Ask, Sound, SpeechService

#: LocalAI's length when the request names none (its 256 MusicGen tokens).
DEFAULT_DURATION_SECONDS = 5.0

router = APIRouter(
    route_class=family_route(elevenlabs_error, validation_status=422), tags=["ElevenLabs"]
)


class SoundGenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    #: A Chorus model name; ElevenLabs' own ids (`eleven_text_to_sound_v2`...) and no id at all
    #: pick the first sound-generation model.
    model_id: str | None = None
    # ElevenLabs' documented range.
    duration_seconds: float | None = Field(None, ge=0.5, le=30)
    # ElevenLabs documents 0-1; LocalAI passes it on as MusicGen's guidance scale (where 3 is
    # the model's own default), so larger values are accepted too.
    prompt_influence: float | None = Field(None, ge=0)
    # LocalAI's addition.
    do_sample: bool | None = None
    loop: bool = False


def _sound_model(service: SpeechService, model_id: str | None) -> ModelConfig:
    if model_id and not model_id.startswith("eleven_"):
        config = service.registry.get(model_id)
        if config.backend not in PROMPT_BACKENDS:
            raise InvalidRequest(
                f"model '{model_id}' is a {config.backend} speech model and cannot generate "
                "sounds; use a transformers-musicgen model",
                param="model_id",
            )
        return config
    for config in service.registry.all():
        if config.backend in PROMPT_BACKENDS:
            return config
    raise ModelNotFound(
        "no sound-generation model is configured; add a config with "
        "'backend: transformers-musicgen'",
        param="model_id",
    )


@router.post("/v1/sound-generation", summary="Sound generation (ElevenLabs, LocalAI)")
async def sound_generation(
    body: SoundGenerationBody,
    output_format: str = Query(DEFAULT_OUTPUT_FORMAT),
    service: SpeechService = Depends(speech_service),
) -> StreamingResponse:
    fmt = parse_output_format(output_format)
    if body.loop:
        raise InvalidRequest("looping sound generation is not supported", param="loop")
    config = _sound_model(service, body.model_id)
    sound = Sound(body.duration_seconds or DEFAULT_DURATION_SECONDS, body.prompt_influence, body.do_sample)
    job = service.prepare(Ask(text=body.text, text_param="text", model=config.name, family="sound-generation",
                              sound=sound))
    return AudioResponse(await service.audio(job, fmt))
