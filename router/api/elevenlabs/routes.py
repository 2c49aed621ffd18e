"""ElevenLabs' HTTP speech routes, /v1/text-to-speech/{voice_id}[/stream][/with-timestamps]: each
translates its request into the one Ask, and its errors into ElevenLabs' shape."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.alignment import CharTimes, TimedSegment, timed_segments
from router.api.common import AudioResponse, family_route, request_caller, speech_service
from router.api.elevenlabs.schemas import (
    TextToSpeechBody,
    ask,
    elevenlabs_error,
    query_format,
    voice_not_found,
)
from router.encoding import AudioFormat, StreamEncoder
from router.speech import SpeechService
from router.voices import Caller

router = APIRouter(
    route_class=family_route(elevenlabs_error, validation_status=422), tags=["ElevenLabs"]
)


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
    fmt: AudioFormat = Depends(query_format),
    service: SpeechService = Depends(speech_service),
    caller: Caller = Depends(request_caller),
) -> Response:
    job = service.prepare(ask(voice_id, body, caller, word_times=True))
    async with voice_not_found(voice_id):
        synthesis = await service.synthesis(job)
    encoder = StreamEncoder(fmt, synthesis.sample_rate)
    segments = _with_tail(timed_segments(synthesis, encoder, whole_chunks=False), encoder)
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
    fmt: AudioFormat = Depends(query_format),
    service: SpeechService = Depends(speech_service),
    caller: Caller = Depends(request_caller),
) -> StreamingResponse:
    job = service.prepare(ask(voice_id, body, caller))
    async with voice_not_found(voice_id):
        stream = await service.audio(job, fmt)
    return AudioResponse(stream)
