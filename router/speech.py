"""What every route shares once it has translated its wire schema: config lookup, overrides,
chunking, dispatch to the runner, and streaming encoding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from anyio import to_thread

from functions import PROMPT_BACKENDS
from functions.config import ModelConfig
from functions.protocol import SynthesisRequest, WordTimes
from functions.streams import Stream, primed, released_by
from router.admission import Admission
from router.cache import CachedAudio, SynthesisCache
from router.chunking import StreamedChunks, chunk_text
from router.encoding import AudioFormat, StreamEncoder
from router.errors import BackendTimeout, ChorusError, InvalidRequest, Overloaded, SynthesisFailed
from router.fan_out import FanOut
from router.metrics import Metrics, note_model
from router.registry import ModelRegistry
from router.runners import PcmStream, Runner
from router.settings import ApiFamily, Settings
from router.stalls import with_stall_timeout

log = logging.getLogger("chorus")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Half of a UTF-16 surrogate pair with no other half: JSON can carry one (`"\\ud800"`), but it
#: is no character, and no backend can encode it.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass
class SpeechJob:
    config: ModelConfig
    request: SynthesisRequest
    #: The wire field that carried the text (`input`, `text`), for errors about it.
    text_param: str = "input"
    #: The text as it arrives, in pieces (a WebSocket's messages); None when the request gave
    #: it whole, as `request.text` (an HTTP route: one piece).
    pieces: AsyncIterator[object] | None = None
    #: The input limit for text that arrives in pieces.
    limit: int = 0

    def text_pieces(self) -> AsyncIterator[object]:
        return self.pieces if self.pieces is not None else _one_piece(self.request.text)

    def no_audio(self) -> ChorusError:
        """The error for a backend that made no sound of the whole text. Without one letter or
        digit (punctuation alone) the text was the problem: 400. Otherwise the voice failed on
        ordinary text: 500. Symbols alone can't be refused up front, since espeak names many
        (an emoji, a snowman)."""
        if not any(char.isalnum() for char in self.request.text):
            return InvalidRequest(
                f"'{self.text_param}' has nothing model '{self.config.name}' can speak: "
                "it holds no letters or digits",
                param=self.text_param,
            )
        return SynthesisFailed(f"model '{self.config.name}' produced no audio")


@dataclass
class AudioStream:
    """Encoded audio whose first bytes are already made, so that any error a request can cause
    has surfaced (as a proper HTTP error) before the response status is sent."""

    media_type: str
    sample_rate: int
    first: bytes
    rest: Stream[bytes]
    #: Response headers the service adds (X-Chorus-Cache).
    headers: dict[str, str] = field(default_factory=dict)

    def __aiter__(self) -> Stream[bytes]:
        return primed(self.first, self.rest)

    async def aclose(self) -> None:
        """Stop synthesis and free the model's place; safe to call more than once, and needed
        when a response is dropped before it is iterated."""
        await self.rest.aclose()


@dataclass(frozen=True)
class TimedPiece:
    """One step of a job's audio: PCM of chunk number `chunk` (its text `text`), the word
    times its backend measured, or (`ended`) the end of that chunk's audio."""

    chunk: int
    text: str
    pcm: bytes = b""
    words: WordTimes | None = None
    ended: bool = False


@dataclass
class TimedAudio:
    sample_rate: int
    pieces: Stream[TimedPiece]
    source: StreamedChunks
    #: The error for a text none of whose chunks made a sound.
    no_audio: Callable[[], ChorusError]

    @property
    def text(self) -> str:
        """The text so far (all of it once the pieces have ended), as its chunks were cut from it."""
        return self.source.text


#: Called as each text chunk's audio is complete: (chunks done, chunks in all, its seconds of
#: audio). Long-text tools show progress with it.
ChunkDone = Callable[[int, int, float], None]


class SpeechService:
    def __init__(
        self,
        registry: ModelRegistry,
        runner: Runner,
        settings: Settings,
        cache: SynthesisCache | None = None,
        metrics: Metrics | None = None,
    ):
        self.registry = registry
        self.runner = runner
        self.settings = settings
        self.cache = cache
        self.metrics = metrics or Metrics()
        runner.observe(self.metrics)
        self.admission = Admission(settings.max_queue, settings.queue_timeout)

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
        family: ApiFamily | None = None,
        pieces: AsyncIterator[object] | None = None,
    ) -> SpeechJob:
        """`family` (the API family) picks the input limit. With `pieces` the text arrives as
        they come (`text` is then ignored): it is checked as it arrives."""
        limit = self.settings.input_limit(family)
        if pieces is None:
            text = _scrub(text)
            if not text.strip():
                raise InvalidRequest(f"'{text_param}' must not be empty", param=text_param)
            check_text(text, limit, text_param)
        else:
            text = ""
        # LocalAI's route (or any request naming a backend) serves models that no config names.
        config = self.registry.get(model, backend, configless=family == "localai" or backend is not None)
        note_model(config.name)
        request = SynthesisRequest(
            model=config.name,
            text=text,
            voice=self.registry.voice_for(config, voice),
            language=language or config.parameters.language,
            speed=speed,
            instructions=instructions,
            seed=seed,
        )
        return SpeechJob(config, request, text_param, pieces, limit)

    async def pcm(self, job: SpeechJob, on_chunk: ChunkDone | None = None) -> PcmStream:
        """PCM for the whole text, in order, each chunk sent to the backend as soon as its
        sentences have arrived. Up to `deploy.fan_out` chunks are synthesised at once (later
        ones while the current one streams); the request holds one of its model's places from
        its first chunk until the stream is closed."""
        timed = await self.timed(job, on_chunk)

        async def pcm() -> AsyncIterator[bytes]:
            async for piece in timed.pieces:
                if piece.pcm:
                    yield piece.pcm

        return PcmStream(timed.sample_rate, released_by(pcm(), timed.pieces.aclose))

    async def timed(self, job: SpeechJob, on_chunk: ChunkDone | None = None) -> TimedAudio:
        """`pcm`, chunk by chunk: each chunk's text with its PCM, the word times its backend
        measured, and its end; for the routes that say when each character is heard."""
        config = job.config
        source = StreamedChunks(
            job.text_pieces(),
            self.settings.chunk_chars,
            # A prompt cut in two would describe two other sounds.
            split=config.backend not in PROMPT_BACKENDS,
            scrub=_scrub,
            check=lambda text: check_text(text, job.limit, job.text_param),
        )
        try:
            first_text = await source.next()
            if first_text is None:
                job.request = job.request.model_copy(update={"text": source.text})
                raise job.no_audio()
            # A request holds as many of the model's inputs as chunks it synthesises at once.
            places = max(1, self.runner.capacity(config) // config.deploy.fan_out)
            gate = self.admission.gate(config.name, config.backend, places)
            try:
                slot = await gate.enter()
            except Overloaded:
                self.metrics.rejected.labels(config.name).inc()
                raise
            # Held until the stream ends, between its chunks too: docker mode stops no worker
            # a request is still using.
            held = self.runner.hold(config)

            def place() -> None:
                slot.leave()
                held()
        except BaseException:
            await source.aclose()
            raise
        try:
            first = await self._open(config, job.request.model_copy(update={"text": first_text}))
        except BaseException as exc:
            place()
            await source.aclose()
            model = config.name
            if config.configless and not self.registry.serves(config):
                # A config-less model that never spoke (a file that is not there) leaves nothing
                # named after it: every name a client makes up would stay for good otherwise.
                model = ""
                note_model(model)
                if self.admission.forget(config.name, config.backend):
                    for gauge in (self.metrics.in_flight, self.metrics.queue_depth):
                        with contextlib.suppress(KeyError):  # made only if /metrics was read meanwhile
                            gauge.remove(config.name)
            if isinstance(exc, ChorusError):
                self.metrics.backend_errors.labels(model, exc.code).inc()
            raise
        if config.configless:
            self.registry.served(config)
        # For progress bars (the CLI): known only for text given whole, and counted only when asked.
        total = 0
        if on_chunk is not None and job.pieces is None:
            split = config.backend not in PROMPT_BACKENDS
            total = len(chunk_text(job.request.text, self.settings.chunk_chars)) if split else 1
        pieces = self._all_chunks(job, source, first_text, first, place, on_chunk, total)
        # Started here, so that its clean-up (the place, the backend streams) runs on close
        # even if nobody ever reads on; the first chunk's errors surface here too.
        head = await anext(pieces, None)
        return TimedAudio(first.sample_rate, pieces if head is None else primed(head, pieces), source, job.no_audio)

    async def _open(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        """One chunk's PCM stream, failing if the backend stalls longer than deploy.timeout."""
        seconds = config.deploy.timeout
        try:
            stream = await asyncio.wait_for(self.runner.stream(config, request), seconds)
        except TimeoutError:
            raise BackendTimeout(f"model '{config.name}' did not start within {seconds} s") from None
        return PcmStream(stream.sample_rate, with_stall_timeout(stream.chunks, seconds, config.name))

    async def _all_chunks(
        self,
        job: SpeechJob,
        source: StreamedChunks,
        first_text: str,
        first: PcmStream,
        place: Callable[[], None],
        on_chunk: ChunkDone | None,
        total: int,
    ) -> AsyncIterator[TimedPiece]:
        config = job.config
        fan_out = FanOut(source, first_text, first, config.deploy.fan_out,
                         lambda text: self._open(config, job.request.model_copy(update={"text": text})))
        started = time.perf_counter()
        samples = 0
        done = 0
        try:
            async with aclosing(fan_out.streams()) as streams:
                async for text, stream in streams:
                    if stream.sample_rate != first.sample_rate:
                        raise SynthesisFailed("the backend changed its sample rate mid-stream")
                    size = 0
                    async with aclosing(stream.chunks) as chunks:
                        async for item in chunks:
                            if isinstance(item, WordTimes):
                                yield TimedPiece(done, text, words=item)
                                continue
                            size += len(item)
                            yield TimedPiece(done, text, pcm=item)
                    yield TimedPiece(done, text, ended=True)
                    samples += size // 2
                    seconds = size / 2 / first.sample_rate
                    self.metrics.audio_seconds.labels(config.name).inc(seconds)
                    done += 1
                    if on_chunk is not None:
                        on_chunk(done, total, seconds)
            if job.pieces is not None:
                job.request = job.request.model_copy(update={"text": source.text})
            if samples:
                rtf = (time.perf_counter() - started) / (samples / first.sample_rate)
                self.metrics.real_time_factor.labels(config.name).observe(rtf)
        except ChorusError as exc:
            self.metrics.backend_errors.labels(config.name, exc.code).inc()
            raise
        finally:
            place()
            fan_out.close()
            await source.aclose()

    def refresh_gauges(self) -> None:
        for gate in self.admission.gates.values():
            self.metrics.in_flight.labels(gate.name).set(gate.active)
            self.metrics.queue_depth.labels(gate.name).set(gate.waiting)
        if self.cache is not None:
            self.metrics.cache_bytes.set(self.cache.size)

    async def audio(
        self, job: SpeechJob, fmt: AudioFormat, on_chunk: ChunkDone | None = None
    ) -> AudioStream:
        if self.cache is None or job.pieces is not None:
            # Text that arrives in pieces has no key until it has all arrived.
            return await self._encoded(job, fmt, on_chunk)

        async def make() -> CachedAudio:
            made = await self._encoded(job, fmt, on_chunk)
            return CachedAudio(made.media_type, made.sample_rate, made.first, made.rest)

        how, audio = await self.cache.serve(self.cache.key(job.config, job.request, fmt), make)
        self.metrics.cache.labels(how).inc()
        return AudioStream(audio.media_type, audio.sample_rate, audio.first, audio.rest,
                           headers={"X-Chorus-Cache": how})

    async def _encoded(
        self, job: SpeechJob, fmt: AudioFormat, on_chunk: ChunkDone | None
    ) -> AudioStream:
        """The job synthesised and encoded, its first bytes made."""
        pcm = await self.pcm(job, on_chunk)
        try:
            encoder = StreamEncoder(fmt, pcm.sample_rate)
        except ValueError as exc:
            await pcm.chunks.aclose()
            raise InvalidRequest(str(exc), param="response_format") from exc

        async def encoded() -> AsyncIterator[bytes]:
            source = pcm.chunks
            produced = False
            try:
                async for chunk in source:
                    produced = True
                    # Off the event loop: encoding a long sentence to MP3 takes tens of ms.
                    data = await to_thread.run_sync(encoder.encode, chunk)
                    if data:
                        yield data
                if not produced:
                    # A WAV or FLAC header alone must not pass for audio.
                    raise job.no_audio()
                tail = await to_thread.run_sync(encoder.finish)
                if tail:
                    yield tail
            finally:
                await source.aclose()

        stream = encoded()
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise job.no_audio() from None
        return AudioStream(fmt.media_type, encoder.output_rate, first, stream)


def _scrub(text: str) -> str:
    # Control characters carry no speech and break phonemisers (a NUL ends espeak's input).
    return _CONTROL.sub(" ", text)


def check_text(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise InvalidRequest(f"'{param}' is {len(text)} characters long; the limit is {limit}", param=param)
    if (broken := _LONE_SURROGATE.search(text)) is not None:
        raise InvalidRequest(
            f"'{param}' is not valid Unicode: character {broken.start()} is half of a UTF-16 surrogate "
            f"pair (U+{ord(broken[0]):04X}) with no other half", param=param,
        )


async def _one_piece(text: str) -> AsyncIterator[object]:
    yield text


@dataclass
class ModelVoices:
    names: list[str]
    #: False when the names come from the config alone: the model has not run to confirm them.
    confirmed: bool = True


async def model_voices(service: SpeechService) -> dict[str, ModelVoices]:
    """Every model's voices: the backend's own, then the public names its config maps. A model
    whose backend cannot be reached, or must not be started to be asked (a cold Modal model),
    lists its config's voice and mapped names, unconfirmed. The backends are asked all at once,
    so one slow worker does not add its delay to every other model's."""
    configs = service.registry.all()

    async def backend_voices(config: ModelConfig) -> ModelVoices:
        try:
            names = await service.runner.voices(config)
        except ChorusError as exc:
            log.warning("cannot list the voices of model '%s': %s", config.name, exc.message)
            names = None
        if names is None:
            return ModelVoices([config.tts.voice] if config.tts.voice else [], confirmed=False)
        return ModelVoices(names)

    listed = await asyncio.gather(*(backend_voices(config) for config in configs))
    return {
        config.name: ModelVoices(list(dict.fromkeys([*voices.names, *config.voices])), voices.confirmed)
        for config, voices in zip(configs, listed, strict=True)
    }
