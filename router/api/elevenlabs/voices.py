"""ElevenLabs' voice routes: listing (/v1/voices, /v2/voices) and instant voice cloning
(/v1/voices/add, then get, edit and delete by voice_id), over the one voice library."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile

from router.api.common import family_route, request_caller, speech_service, uploads
from router.api.elevenlabs.schemas import elevenlabs_error
from router.errors import InvalidRequest
from router.speech import SpeechService, model_voices
from router.voices import Caller, Voice, VoiceDetails, labels_from_json

router = APIRouter(route_class=family_route(elevenlabs_error, validation_status=422), tags=["ElevenLabs"])

#: A voice id in a path; longer ones are no voice of any model.
VoiceId = Annotated[str, Path(min_length=1, max_length=256)]


def saved_voice_json(voice: Voice, models: list[str]) -> dict:
    return {
        "voice_id": voice.id,
        "name": voice.name,
        "category": "cloned",
        "labels": voice.labels,
        "description": voice.description,
        "preview_url": None,
        "high_quality_base_model_ids": models,
        "created_at_unix": voice.created,
        "is_owner": True,
    }


async def _voices(service: SpeechService, caller: Caller) -> list[dict]:
    own = service.voices.all(caller)
    saved = {voice.id: voice for voice in own}
    by_voice: dict[str, list[str]] = {}
    unconfirmed: set[str] = set()
    for model, voices in (await model_voices(service, own)).items():
        for voice in voices.names:
            by_voice.setdefault(voice, []).append(model)
            if not voices.confirmed:
                unconfirmed.add(voice)
    premade = [
        {
            "voice_id": voice,
            "name": voice,
            "category": "premade",
            "labels": {"confirmed": "false"} if voice in unconfirmed else {},
            "description": f"served by {', '.join(models)}"
            + (" (not yet confirmed: the model has not run)" if voice in unconfirmed else ""),
            "preview_url": None,
            "high_quality_base_model_ids": models,
        }
        for voice, models in by_voice.items()
        if voice not in saved
    ]
    # Every saved voice, even one no model served now can speak: its owner must see it to delete it.
    return premade + [saved_voice_json(voice, service.cloning_models(voice)) for voice in saved.values()]


@router.get("/v1/voices", summary="List voices (ElevenLabs)")
async def list_voices(service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller)):
    return {"voices": await _voices(service, caller)}


@router.get("/v2/voices", summary="Search voices (ElevenLabs)")
async def search_voices(
    search: str | None = Query(None), service: SpeechService = Depends(speech_service),
    caller: Caller = Depends(request_caller),
):
    voices = [
        voice
        for voice in await _voices(service, caller)
        if not search or search.lower() in voice["name"].lower()
    ]
    return {"voices": voices, "has_more": False, "total_count": len(voices), "next_page_token": None}


class VoiceForm:
    """ElevenLabs' form for adding a voice and editing one."""

    def __init__(
        self,
        name: str | None = Form(None),
        files: list[UploadFile] = File(default_factory=list),
        description: str | None = Form(None),
        labels: str | None = Form(None),
        # Accepted for compatibility: the recording is kept as it was sent.
        remove_background_noise: bool = Form(False),
    ):
        self.files = files
        self.details = VoiceDetails(name=name, description=description, labels=labels_from_json(labels))


@router.post("/v1/voices/add", summary="Clone a voice from recordings (ElevenLabs instant voice cloning)")
async def add_voice(form: VoiceForm = Depends(), service: SpeechService = Depends(speech_service),
                    caller: Caller = Depends(request_caller)):
    voice = await to_thread.run_sync(service.voices.create, await uploads(form.files), form.details, caller)
    return {"voice_id": voice.id, "requires_verification": False}


@router.get("/v1/voices/{voice_id}", summary="Get a voice (ElevenLabs)")
async def get_voice(voice_id: VoiceId, service: SpeechService = Depends(speech_service),
                    caller: Caller = Depends(request_caller)):
    voice = service.voices.get(voice_id, caller)
    return saved_voice_json(voice, service.cloning_models(voice))


@router.post("/v1/voices/{voice_id}/edit", summary="Edit a voice's name, description or labels (ElevenLabs)")
async def edit_voice(voice_id: VoiceId, form: VoiceForm = Depends(), service: SpeechService = Depends(speech_service),
                     caller: Caller = Depends(request_caller)):
    if form.files:
        raise InvalidRequest("a saved voice's recording cannot be replaced: add a new voice from the new files",
                             param="files")
    await to_thread.run_sync(service.voices.edit, voice_id, form.details, caller)
    return {"status": "ok"}


@router.delete("/v1/voices/{voice_id}", summary="Delete a voice (ElevenLabs)")
async def delete_voice(voice_id: VoiceId, service: SpeechService = Depends(speech_service),
                       caller: Caller = Depends(request_caller)):
    await to_thread.run_sync(service.voices.delete, voice_id, caller)
    return {"status": "ok"}
