"""LocalAI's routes: /tts, its request translated into the one Ask, and its voice library's
profiles (/api/voice-profiles) over the one voice library; its errors in its shape."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, Path, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from router.api.common import AudioResponse, family_route, request_caller, speech_service, uploads
from router.api.localai.schemas import LOCALAI_FORMATS, PROFILE_URI, TTSBody, localai_error, profile_voice
from router.errors import InvalidRequest
from router.speech import Ask, SpeechService
from router.voices import Caller, Voice, VoiceDetails

router = APIRouter(route_class=family_route(localai_error, validation_status=400), tags=["LocalAI"])


@router.post("/tts", summary="Text to speech (LocalAI)")
async def tts(body: TTSBody, service: SpeechService = Depends(speech_service),
              caller: Caller = Depends(request_caller)) -> StreamingResponse:
    job = service.prepare(Ask(
        text=body.input,
        text_param="input",
        model=body.model,
        family="localai",
        voice=profile_voice(body.voice),
        language=body.language,
        backend=body.backend,
        caller=caller,
    ))
    fmt = LOCALAI_FORMATS.get((body.response_format or "wav").lower(), LOCALAI_FORMATS["wav"])
    return AudioResponse(await service.audio(job, fmt))


ProfileId = Annotated[str, Path(min_length=1, max_length=256)]


def _profile_json(voice: Voice, models: list[str]) -> dict:
    return {"id": voice.id, "uri": f"{PROFILE_URI}{voice.id}", "name": voice.name, "language": voice.language,
            "transcript": voice.transcript, "duration_seconds": voice.seconds, "created_at": voice.created,
            "models": models}


@router.get("/api/voice-profiles", summary="List voice profiles (LocalAI's voice library)")
async def list_profiles(service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller)):
    return {"profiles": [_profile_json(v, service.cloning_models(v)) for v in service.voices.all(caller)]}


@router.post("/api/voice-profiles", summary="Create a voice profile from a reference clip (LocalAI)")
async def create_profile(
    name: str = Form(...), audio: UploadFile = File(...), transcript: str | None = Form(None),
    language: str | None = Form(None), consent: bool = Form(False),
    # Comma-separated: the only models that may speak it; none, every cloning model.
    models: str | None = Form(None),
    service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller),
):
    # LocalAI's library asks the user to confirm they may clone the voice.
    if not consent:
        raise InvalidRequest("confirm you have permission to clone this voice: send consent=true", param="consent")
    chosen = tuple(name.strip() for name in (models or "").split(",") if name.strip())
    able = service.cloning_models()
    if unknown := [model for model in chosen if model not in able]:
        raise InvalidRequest(f"{', '.join(unknown)}: no cloning model of this server; models that can clone: "
                             f"{', '.join(able) or 'none is configured'}", param="models")
    details = VoiceDetails(name=name, transcript=transcript, language=language, models=chosen)
    voice = await to_thread.run_sync(service.voices.create, await uploads([audio]), details, caller)
    return _profile_json(voice, service.cloning_models(voice))


@router.get("/api/voice-profiles/{profile_id}", summary="Get a voice profile (LocalAI)")
async def get_profile(profile_id: ProfileId, service: SpeechService = Depends(speech_service),
                      caller: Caller = Depends(request_caller)):
    voice = service.voices.get(profile_id, caller)
    return _profile_json(voice, service.cloning_models(voice))


@router.get("/api/voice-profiles/{profile_id}/audio", summary="A voice profile's reference clip, as WAV (LocalAI)")
async def profile_audio(profile_id: ProfileId, service: SpeechService = Depends(speech_service),
                        caller: Caller = Depends(request_caller)):
    voice = service.voices.get(profile_id, caller)
    return FileResponse(service.settings.models_dir / voice.reference, media_type="audio/wav")


@router.delete("/api/voice-profiles/{profile_id}", summary="Delete a voice profile (LocalAI)")
async def delete_profile(profile_id: ProfileId, service: SpeechService = Depends(speech_service),
                         caller: Caller = Depends(request_caller)):
    await to_thread.run_sync(service.voices.delete, profile_id, caller)
    return {"deleted": profile_id}
