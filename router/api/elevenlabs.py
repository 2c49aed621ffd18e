"""ElevenLabs' text-to-speech API: /v1/text-to-speech/{voice_id}[/stream], /v1/voices, /v2/voices."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from router.alignment import CharTimes, TimedSegment, timed_segments
from router.api.common import AudioResponse, family_route, speech_service
from router.encoding import AudioFormat, StreamEncoder
from router.errors import InvalidRequest, VoiceNotFound
from router.speech import SpeechJob, SpeechService, model_voices

DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
# ElevenLabs' own codes: codec_samplerate[_bitrate in kbit/s].
_OUTPUT_FORMATS: dict[str, set[tuple[int, int | None]]] = {
    "mp3": {(22050, 32), (24000, 48), *((44100, kbps) for kbps in (32, 64, 96, 128, 192))},
    "pcm": {(rate, None) for rate in (8000, 16000, 22050, 24000, 32000, 44100, 48000)},
    "wav": {(rate, None) for rate in (8000, 16000, 22050, 24000, 32000, 44100, 48000)},
    "opus": {(48000, kbps) for kbps in (32, 64, 96, 128, 192)},
    "ulaw": {(8000, None)},
    "alaw": {(8000, None)},
}
_FORMAT_CODE = re.compile(r"^([a-z0-9]+)_(\d+)(?:_(\d+))?$")


def output_formats() -> list[str]:
    return sorted(
        f"{codec}_{rate}" + (f"_{kbps}" if kbps else "")
        for codec, variants in _OUTPUT_FORMATS.items()
        for rate, kbps in variants
    )


def parse_output_format(code: str) -> AudioFormat:
    match = _FORMAT_CODE.match(code)
    if match:
        codec, rate, kbps = match.group(1), int(match.group(2)), match.group(3)
        kbps_value = int(kbps) if kbps else None
        if (rate, kbps_value) in _OUTPUT_FORMATS.get(codec, set()):
            return AudioFormat(
                codec, sample_rate=rate, bit_rate=kbps_value * 1000 if kbps_value else None
            )
    raise InvalidRequest(
        f"output_format '{code}' is not supported; use one of: {', '.join(output_formats())}",
        param="output_format",
    )


def elevenlabs_error(status: int, message: str, param: str | None, code: str) -> JSONResponse:
    return JSONResponse({"detail": {"status": code, "message": message}}, status_code=status)


router = APIRouter(
    route_class=family_route(elevenlabs_error, validation_status=422), tags=["ElevenLabs"]
)


class VoiceSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    stability: float | None = Field(None, ge=0, le=1)
    similarity_boost: float | None = Field(None, ge=0, le=1)
    style: float | None = Field(None, ge=0, le=1)
    use_speaker_boost: bool | None = None
    # ElevenLabs' documented range.
    speed: float | None = Field(None, ge=0.7, le=1.2)


class TextToSpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    model_id: str | None = None
    language_code: str | None = None
    voice_settings: VoiceSettings | None = None
    seed: int | None = Field(None, ge=0, le=4294967295)


class _VoiceIdConvertor(Convertor[str]):
    """A voice id in a path: never empty, and it may hold a slash (Bark's v2/en_speaker_6, a
    clone's voices/ref.wav), sent plain or as %2F."""

    regex = ".+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("voice_id", _VoiceIdConvertor())


class SpeechQuery:
    """The query string of the speech routes."""

    def __init__(
        self,
        output_format: str = Query(DEFAULT_OUTPUT_FORMAT),
        # Accepted for compatibility: Chorus always streams as early as it can.
        optimize_streaming_latency: int | None = Query(None, ge=0, le=4),
        enable_logging: bool = Query(True),
    ):
        self.output_format = output_format


def prepare(service: SpeechService, voice_id: str, body: TextToSpeechBody,
            pieces: AsyncIterator[object] | None = None) -> SpeechJob:
    speed = body.voice_settings.speed if body.voice_settings else None
    return service.prepare(
        text=body.text,
        text_param="text",
        model=body.model_id,
        voice=voice_id,
        language=body.language_code,
        speed=speed or 1.0,
        seed=body.seed,
        family="elevenlabs",
        pieces=pieces,
    )


@asynccontextmanager
async def voice_not_found(voice_id: str) -> AsyncIterator[None]:
    """ElevenLabs answers an unknown voice_id with 404 voice_not_found; its clients expect it."""
    try:
        yield
    except InvalidRequest as exc:
        if exc.param != "voice":
            raise
        raise VoiceNotFound(
            f"A voice with the voice_id {voice_id} was not found. {exc.message}", param="voice_id"
        ) from exc


def alignment_json(times: CharTimes | None) -> dict | None:
    # No characters, no alignment: an empty one is a broken one to clients (Pipecat warns).
    if not times:
        return None
    return {
        "characters": times.characters,
        "character_start_times_seconds": [round(t, 3) for t in times.starts],
        "character_end_times_seconds": [round(t, 3) for t in times.ends],
    }


def _timed_json(segment: TimedSegment) -> dict:
    # Chorus speaks the text as written: its normalized text is the text itself.
    alignment = alignment_json(segment.alignment)
    return {"audio_base64": base64.b64encode(segment.audio).decode(), "alignment": alignment,
            "normalized_alignment": alignment}


# Registered first, longest first (decorators apply bottom-up), so that ".../stream" and
# ".../with-timestamps" are never read as part of a voice id.
@router.post("/v1/text-to-speech/{voice_id:voice_id}/with-timestamps",
             summary="Text to speech with character timings (ElevenLabs)")
@router.post("/v1/text-to-speech/{voice_id:voice_id}/stream/with-timestamps",
             summary="Text to speech with character timings, streamed as JSON lines (ElevenLabs)")
async def text_to_speech_with_timestamps(
    request: Request,
    voice_id: str,
    body: TextToSpeechBody,
    query: SpeechQuery = Depends(),
    service: SpeechService = Depends(speech_service),
) -> Response:
    fmt = parse_output_format(query.output_format)
    job = prepare(service, voice_id, body)
    job.request = job.request.model_copy(update={"word_times": True})
    async with voice_not_found(voice_id):
        timed = await service.timed(job)
    encoder = StreamEncoder(fmt, timed.sample_rate)
    segments = _with_tail(timed_segments(timed, encoder, whole_chunks=False), encoder)
    if not request.url.path.endswith("/stream/with-timestamps"):
        audio, alignment = bytearray(), CharTimes()
        async with aclosing(segments):
            async for segment in segments:
                audio += segment.audio
                alignment.extend(segment.alignment or CharTimes())
        return JSONResponse(_timed_json(TimedSegment(bytes(audio), alignment)))
    # The first line is made before the status is sent, so that its errors are proper ones.
    first = await anext(segments)
    return AudioResponse(segments, _lines(first, segments), media_type="application/x-ndjson")


async def _with_tail(segments: AsyncIterator[TimedSegment], encoder: StreamEncoder) -> AsyncIterator[TimedSegment]:
    """`segments`, then the encoder's last bytes, with the spaces after the last word if the
    segments ended with those."""
    ending: TimedSegment | None = None  # one with no audio, sent with the next bytes
    async with aclosing(segments):
        async for segment in segments:
            if ending is not None:
                yield ending
                ending = None
            if segment.audio:
                yield segment
            else:
                ending = segment
    tail = await to_thread.run_sync(encoder.finish)
    if tail or ending is not None:
        yield TimedSegment(tail, ending.alignment if ending is not None else None)


async def _lines(first: TimedSegment, rest: AsyncIterator[TimedSegment]) -> AsyncIterator[bytes]:
    async with aclosing(rest):
        yield (json.dumps(_timed_json(first)) + "\n").encode()
        async for segment in rest:
            yield (json.dumps(_timed_json(segment)) + "\n").encode()


@router.post("/v1/text-to-speech/{voice_id:voice_id}", summary="Text to speech (ElevenLabs)")
@router.post("/v1/text-to-speech/{voice_id:voice_id}/stream", summary="Text to speech, streamed (ElevenLabs)")
async def text_to_speech(
    voice_id: str,
    body: TextToSpeechBody,
    query: SpeechQuery = Depends(),
    service: SpeechService = Depends(speech_service),
) -> StreamingResponse:
    fmt = parse_output_format(query.output_format)
    job = prepare(service, voice_id, body)
    async with voice_not_found(voice_id):
        stream = await service.audio(job, fmt)
    return AudioResponse(stream)


async def _voices(service: SpeechService) -> list[dict]:
    by_voice: dict[str, list[str]] = {}
    unconfirmed: set[str] = set()
    for model, voices in (await model_voices(service)).items():
        for voice in voices.names:
            by_voice.setdefault(voice, []).append(model)
            if not voices.confirmed:
                unconfirmed.add(voice)
    return [
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
    ]


@router.get("/v1/voices", summary="List voices (ElevenLabs)")
async def list_voices(service: SpeechService = Depends(speech_service)):
    return {"voices": await _voices(service)}


@router.get("/v2/voices", summary="Search voices (ElevenLabs)")
async def search_voices(
    search: str | None = Query(None), service: SpeechService = Depends(speech_service)
):
    voices = [
        voice
        for voice in await _voices(service)
        if not search or search.lower() in voice["name"].lower()
    ]
    return {"voices": voices, "has_more": False, "total_count": len(voices), "next_page_token": None}
