"""ElevenLabs' API as it comes over the wire: its bodies and query strings, its sockets' messages,
its output formats, its error shape, and the one Ask a request of it makes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from router.chunking import Fragments
from router.encoding import AudioFormat
from router.errors import InvalidRequest, VoiceNotFound
from router.speech import Ask
from router.voices import Caller

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


def query_format(
    output_format: str = Query(DEFAULT_OUTPUT_FORMAT),
    # Accepted for compatibility: Chorus always streams as early as it can.
    optimize_streaming_latency: int | None = Query(None, ge=0, le=4),
    enable_logging: bool = Query(True),
) -> AudioFormat:
    """The audio format the speech routes' query string asks for."""
    return parse_output_format(output_format)


def ask(voice_id: str, body: TextToSpeechBody, caller: Caller, text: str | Fragments | None = None,
        word_times: bool = False) -> Ask:
    """The one Ask an ElevenLabs request makes: `body`'s text, or `text` (a socket's fragments)."""
    speed = body.voice_settings.speed if body.voice_settings else None
    return Ask(text=body.text if text is None else text, text_param="text", model=body.model_id,
               family="elevenlabs", voice=voice_id, language=body.language_code, speed=speed or 1.0,
               seed=body.seed, word_times=word_times, caller=caller)


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


#: ElevenLabs' default `chunk_length_schedule`: characters buffered before each generation.
DEFAULT_SCHEDULE = (120, 160, 250, 290)


class SocketOptions(BaseModel):
    """The query string of both sockets."""

    model_config = ConfigDict(extra="ignore")

    model_id: str | None = None
    output_format: str = "mp3_44100_128"
    language_code: str | None = None
    # ElevenLabs' default and largest value, in seconds.
    inactivity_timeout: float = Field(20, gt=0, le=180)
    sync_alignment: bool = False
    auto_mode: bool = False
    enable_logging: bool = True
    enable_ssml_parsing: bool = False
    apply_text_normalization: str = "auto"
    seed: int | None = Field(None, ge=0, le=4294967295)
    authorization: str | None = None


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    chunk_length_schedule: list[int] = Field(default_factory=lambda: list(DEFAULT_SCHEDULE), min_length=1)


class ClientMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    text: str | None = None
    context_id: str | None = Field(None, min_length=1, max_length=256)
    flush: bool = False
    try_trigger_generation: bool = False
    close_context: bool = False
    close_socket: bool = False
    voice_settings: VoiceSettings | None = None
    generation_config: GenerationConfig | None = None
    xi_api_key: str | None = Field(None, alias="xi-api-key")
    xi_api_key_underscored: str | None = Field(None, alias="xi_api_key")
    authorization: str | None = None

    def key(self) -> str | None:
        return self.xi_api_key or self.xi_api_key_underscored or self.authorization


class SocketError(Exception):
    """A refusal sent as ElevenLabs' error message; `fatal` ones close the socket (1008)."""

    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal
