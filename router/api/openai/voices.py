"""OpenAI's custom voices: a consent recording (/v1/audio/voice_consents), then a voice from an
audio sample and that consent (/v1/audio/voices), over the one voice library. The voice's id is
then a `voice` ({"id": ...}) of /v1/audio/speech, as on OpenAI."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import Depends, File, Form, Path, UploadFile

from router.api.common import request_caller, speech_service, uploads
from router.api.openai.routes import router
from router.errors import InvalidRequest, NotFound
from router.speech import SpeechService
from router.voices import Caller, Consent, VoiceDetails

#: OpenAI's limit on a custom voice's sample.
SAMPLE_SECONDS = 30.0
ItemId = Annotated[str, Path(min_length=1, max_length=256)]


def _consent_json(consent: Consent) -> dict:
    return {"id": consent.id, "object": "audio.voice_consent", "name": consent.name, "language": consent.language,
            "created_at": consent.created}


@router.post("/v1/audio/voice_consents", summary="Upload a consent recording (OpenAI custom voices)")
async def create_consent(
    name: str = Form(...), language: str = Form(...), recording: UploadFile = File(...),
    service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller),
):
    (upload,) = await uploads([recording])
    consent = await to_thread.run_sync(service.voices.add_consent, upload, name, language, caller)
    return _consent_json(consent)


@router.get("/v1/audio/voice_consents", summary="List consent recordings (OpenAI custom voices)")
async def list_consents(service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller)):
    data = [_consent_json(consent) for consent in service.voices.consents(caller)]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


@router.get("/v1/audio/voice_consents/{consent_id}", summary="Get a consent recording (OpenAI custom voices)")
async def get_consent(consent_id: ItemId, service: SpeechService = Depends(speech_service),
                      caller: Caller = Depends(request_caller)):
    consent = service.voices.consent(consent_id, caller)
    if consent is None:
        raise NotFound(f"consent '{consent_id}' was not found", param="consent_id")
    return _consent_json(consent)


@router.delete("/v1/audio/voice_consents/{consent_id}", summary="Delete a consent recording (OpenAI custom voices)")
async def delete_consent(consent_id: ItemId, service: SpeechService = Depends(speech_service),
                         caller: Caller = Depends(request_caller)):
    await to_thread.run_sync(service.voices.delete_consent, consent_id, caller)
    return {"id": consent_id, "object": "audio.voice_consent.deleted", "deleted": True}


@router.post("/v1/audio/voices", summary="Create a custom voice from a sample and a consent (OpenAI)")
async def create_voice(
    name: str = Form(...), consent: str = Form(...), audio_sample: UploadFile = File(...),
    type: str = Form("audio_sample"),
    service: SpeechService = Depends(speech_service), caller: Caller = Depends(request_caller),
):
    if type != "audio_sample":
        raise InvalidRequest("only audio_sample voices are made here: send a sample and a consent", param="type")
    found = service.voices.consent(consent, caller)
    details = VoiceDetails(name=name, consent=consent, language=found.language if found else None)
    voice = await to_thread.run_sync(service.voices.create, await uploads([audio_sample]), details, caller,
                                     SAMPLE_SECONDS, "audio_sample")
    return {"id": voice.id, "object": "audio.voice", "name": voice.name, "created_at": voice.created,
            "type": "audio_sample"}


@router.delete("/v1/audio/voices/{voice_id}", summary="Delete a custom voice (OpenAI)")
async def delete_voice(voice_id: ItemId, service: SpeechService = Depends(speech_service),
                       caller: Caller = Depends(request_caller)):
    await to_thread.run_sync(service.voices.delete, voice_id, caller)
    return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}
