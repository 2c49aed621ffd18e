"""What every route shares once it has translated its wire schema: config lookup, overrides,
chunking, dispatch to the runner, and streaming encoding."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from anyio import to_thread

from functions.config import ModelConfig
from functions.protocol import SynthesisRequest
from router.chunking import chunk_text
from router.encoding import AudioFormat, StreamEncoder
from router.errors import ChorusError, InvalidRequest, SynthesisFailed
from router.registry import ModelRegistry
from router.runners import PcmStream, Runner
from router.settings import Settings

log = logging.getLogger("chorus")


@dataclass
class SpeechJob:
    config: ModelConfig
    request: SynthesisRequest


@dataclass
class AudioStream:
    """Encoded audio whose first bytes are already made, so that any error a request can cause
    has surfaced (as a proper HTTP error) before the response status is sent."""

    media_type: str
    sample_rate: int
    first: bytes
    rest: AsyncIterator[bytes]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            yield self.first
            async for chunk in self.rest:
                yield chunk
        finally:
            await self.rest.aclose()  # type: ignore[attr-defined]


class SpeechService:
    def __init__(self, registry: ModelRegistry, runner: Runner, settings: Settings):
        self.registry = registry
        self.runner = runner
        self.settings = settings

    def prepare(
        self,
        *,
        text: str,
        text_param: str,
        model: str | None,
        voice: str | None = None,
        language: str | None = None,
        speed: float = 1.0,
        instructions: str | None = None,
        seed: int | None = None,
        backend: str | None = None,
    ) -> SpeechJob:
        if not text.strip():
            raise InvalidRequest(f"'{text_param}' must not be empty", param=text_param)
        if len(text) > self.settings.max_input_chars:
            raise InvalidRequest(
                f"'{text_param}' is {len(text)} characters long; the limit is "
                f"{self.settings.max_input_chars}",
                param=text_param,
            )
        config = self.registry.get(model, backend)
        request = SynthesisRequest(
            model=config.name,
            text=text,
            voice=self.registry.voice_for(config, voice),
            language=language or config.parameters.language,
            speed=speed,
            instructions=instructions,
            seed=seed,
        )
        return SpeechJob(config, request)

    async def pcm(self, job: SpeechJob) -> PcmStream:
        """PCM for the whole text, synthesised chunk after chunk."""
        chunks = chunk_text(job.request.text, self.settings.chunk_chars)
        first = await self.runner.stream(job.config, job.request.model_copy(update={"text": chunks[0]}))

        async def all_chunks() -> AsyncIterator[bytes]:
            async for pcm in first.chunks:
                yield pcm
            for text in chunks[1:]:
                stream = await self.runner.stream(
                    job.config, job.request.model_copy(update={"text": text})
                )
                if stream.sample_rate != first.sample_rate:
                    raise SynthesisFailed("the backend changed its sample rate mid-stream")
                async for pcm in stream.chunks:
                    yield pcm

        return PcmStream(first.sample_rate, all_chunks())

    async def audio(self, job: SpeechJob, fmt: AudioFormat) -> AudioStream:
        pcm = await self.pcm(job)
        try:
            encoder = StreamEncoder(fmt, pcm.sample_rate)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="response_format") from exc

        async def encoded() -> AsyncIterator[bytes]:
            source = pcm.chunks
            try:
                async for chunk in source:
                    # Off the event loop: encoding a long sentence to MP3 takes tens of ms.
                    data = await to_thread.run_sync(encoder.encode, chunk)
                    if data:
                        yield data
                tail = encoder.finish()
                if tail:
                    yield tail
            finally:
                await source.aclose()  # type: ignore[attr-defined]

        stream = encoded()
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise SynthesisFailed(f"model '{job.config.name}' produced no audio") from None
        return AudioStream(fmt.media_type, encoder.output_rate, first, stream)


async def model_voices(service: SpeechService) -> dict[str, list[str]]:
    """Every model's voices: the backend's own, then the public names its config maps.
    A model whose backend cannot be reached still lists its mapped names."""
    listing: dict[str, list[str]] = {}
    for config in service.registry.all():
        names: list[str] = []
        try:
            names.extend(await service.runner.voices(config))
        except ChorusError as exc:
            log.warning("cannot list the voices of model '%s': %s", config.name, exc.message)
        names.extend(config.voices)
        listing[config.name] = list(dict.fromkeys(names))
    return listing
