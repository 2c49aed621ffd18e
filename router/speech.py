"""What every front door shares once it has translated its wire schema: the one request (`Ask`)
becomes a job (its model's config, the voice, language and limits applied), the job a synthesis
(router/synthesis.py), the synthesis encoded audio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from anyio import to_thread

from functions.config import ModelConfig
from functions.protocol import SynthesisRequest
from functions.streams import released_by
from router import text as rules
from router.admission import Admission
from router.cache import SynthesisCache
from router.chunking import Fragments
from router.encoding import AudioFormat, EncodedAudio, StreamEncoder
from router.errors import ChorusError, InvalidRequest, VoiceNotFound
from router.metrics import Metrics, note_model
from router.registry import ModelRegistry
from router.runners import PcmStream, Runner
from router.settings import ApiFamily, Settings
from router.synthesis import ChunkDone, Synthesis
from router.voices import Caller, Voice, VoiceLibrary, in_library

log = logging.getLogger("chorus")


@dataclass(frozen=True)
class Sound:
    """Sound generation's settings (a prompt model's): the clip's length, the guidance scale,
    whether to sample; None keeps the model's default."""

    duration_seconds: float | None = None
    guidance_scale: float | None = None
    do_sample: bool | None = None


@dataclass(frozen=True)
class Ask:
    """What a front door asks for, in the one shape every API family's request is translated
    into. `text` is the whole text, or its fragments as they arrive (a WebSocket's messages);
    `text_param` names the wire field that carried it, for errors about it; `family` picks the
    input limit, and LocalAI's serves models no config names. `caller` decides which saved
    voices `voice` may name."""

    text: str | Fragments
    text_param: str
    model: str | None
    family: ApiFamily | None = None
    voice: str | None = None
    language: str | None = None
    speed: float = 1.0
    instructions: str | None = None
    seed: int | None = None
    backend: str | None = None
    #: The timestamp routes and sockets: the backend's measured word times, where it has them.
    word_times: bool = False
    sound: Sound = Sound()
    caller: Caller = Caller()


@dataclass(frozen=True)
class SpeechJob:
    """A request ready to be spoken: its model's config, the backend's request with every
    override applied (its text the whole text, or empty while `fragments` bring it), the limit
    its text must keep, and the model's name in metrics."""

    config: ModelConfig
    request: SynthesisRequest
    text_param: str
    limit: int
    metric_name: str
    fragments: Fragments | None = None

    @property
    def text(self) -> str:
        return self.request.text


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
        self.voices = VoiceLibrary(settings.models_dir, settings.max_voices, runner.models_volume())

    def prepare(self, ask: Ask) -> SpeechJob:
        """The job `ask` makes. A whole text is cleaned and checked now; fragments are, as they
        arrive."""
        limit = self.settings.input_limit(ask.family)
        text = ""
        if isinstance(ask.text, str):
            text = rules.clean(ask.text)
            if not text.strip():
                raise InvalidRequest(f"'{ask.text_param}' must not be empty", param=ask.text_param)
            rules.check(text, limit, ask.text_param)
        saved = self.voices.find(ask.voice, ask.caller)
        if saved is None and in_library(ask.voice):
            # By its path a saved voice would reach a backend unchecked, whoever's it is.
            raise VoiceNotFound("a saved voice is named by its id, not by a path", param="voice")
        model = ask.model
        if saved is not None and model is None:
            # A saved voice with no model named: the first model that can speak it.
            model = next(iter(self.cloning_models(saved)), None)
        # LocalAI's route (or any request naming a backend) serves models that no config names.
        config = self.registry.get(model, ask.backend, configless=ask.family == "localai" or ask.backend is not None)
        metric_name = self.registry.metric_name(config)
        note_model(metric_name)
        voice = self.registry.voice_for(config, ask.voice)
        if saved is not None:
            able = self.cloning_models(saved)
            if config.name not in able:
                raise InvalidRequest(
                    f"voice '{saved.id}' ({saved.name}) is a cloned voice, which model '{config.name}' cannot "
                    f"speak; models that can: {', '.join(able) or 'none is configured'}", param="voice")
            voice = saved.reference
        request = SynthesisRequest(
            model=config.name,
            text=text,
            voice=voice,
            language=ask.language or (saved.language if saved else None) or config.parameters.language,
            speed=ask.speed,
            instructions=ask.instructions,
            seed=ask.seed,
            word_times=ask.word_times,
            duration_seconds=ask.sound.duration_seconds,
            guidance_scale=ask.sound.guidance_scale,
            do_sample=ask.sound.do_sample,
        )
        fragments = None if isinstance(ask.text, str) else ask.text
        return SpeechJob(config, request, ask.text_param, limit, metric_name, fragments)

    def cloning_models(self, voice: Voice | None = None) -> list[str]:
        """The models this server serves that may speak the saved `voice` (any, for None)."""
        return self.voices.usable(voice, self.registry.all())

    async def synthesis(self, job: SpeechJob, on_chunk: ChunkDone | None = None) -> Synthesis:
        """The job's synthesis, open: its first chunk's audio begun."""
        synthesis = Synthesis(job, self.runner, self.admission, self.metrics, self.settings.chunk_chars, on_chunk)
        try:
            await synthesis.open()
        except BaseException:
            if not job.metric_name:
                self._forget(job.config)
            raise
        if job.config.configless:
            self.registry.served(job.config)
        return synthesis

    def _forget(self, config: ModelConfig) -> None:
        """Nothing is kept named after a config-less model that never spoke (a file that is not
        there): every name a client makes up would stay for good otherwise."""
        if self.admission.forget(config.name, config.backend):
            for gauge in (self.metrics.in_flight, self.metrics.queue_depth):
                with contextlib.suppress(KeyError):  # made only if /metrics was read meanwhile
                    gauge.remove(config.name)

    async def pcm(self, job: SpeechJob, on_chunk: ChunkDone | None = None) -> PcmStream:
        """The job's PCM, in order, as the backend makes it (its word times left out)."""
        synthesis = await self.synthesis(job, on_chunk)

        async def pcm() -> AsyncIterator[bytes]:
            async for step in synthesis:
                if step.pcm:
                    yield step.pcm

        return PcmStream(synthesis.sample_rate, released_by(pcm(), synthesis.aclose))

    async def audio(self, job: SpeechJob, fmt: AudioFormat, on_chunk: ChunkDone | None = None) -> EncodedAudio:
        """The job's audio in `fmt`, its first bytes made; from the cache where it keeps it."""
        if self.cache is None or job.fragments is not None:
            # Text that arrives in fragments has no key until it has all arrived.
            return await self._encoded(job, fmt, on_chunk)
        how, audio = await self.cache.serve(self.cache.key(job.config, job.request, fmt),
                                            lambda: self._encoded(job, fmt, on_chunk))
        self.metrics.cache.labels(how).inc()
        audio.headers["X-Chorus-Cache"] = how
        return audio

    async def _encoded(self, job: SpeechJob, fmt: AudioFormat, on_chunk: ChunkDone | None) -> EncodedAudio:
        synthesis = await self.synthesis(job, on_chunk)
        try:
            encoder = StreamEncoder(fmt, synthesis.sample_rate)
        except ValueError as exc:
            await synthesis.aclose()
            raise InvalidRequest(str(exc), param="response_format") from exc

        async def encoded() -> AsyncIterator[bytes]:
            produced = False
            async for step in synthesis:
                produced = produced or bool(step.pcm)
                # Off the event loop: encoding a long sentence to MP3 takes tens of ms.
                if step.pcm and (data := await to_thread.run_sync(encoder.encode, step.pcm)):
                    yield data
            if not produced:
                raise synthesis.no_audio()  # a WAV or FLAC header alone must not pass for audio
            tail = await to_thread.run_sync(encoder.finish)
            if tail:
                yield tail

        stream = released_by(encoded(), synthesis.aclose)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise synthesis.no_audio() from None
        return EncodedAudio(fmt.media_type, encoder.output_rate, first, stream)

    def refresh_gauges(self) -> None:
        for gate in self.admission.gates.values():
            self.metrics.in_flight.labels(gate.name).set(gate.active)
            self.metrics.queue_depth.labels(gate.name).set(gate.waiting)
        if self.cache is not None:
            self.metrics.cache_bytes.set(self.cache.size)


@dataclass
class ModelVoices:
    names: list[str]
    #: False when the names come from the config alone: the model has not run to confirm them.
    confirmed: bool = True


async def model_voices(service: SpeechService, saved: Sequence[Voice] = ()) -> dict[str, ModelVoices]:
    """Every model's voices: the backend's own, the public names its config maps, then those of the
    `saved` voices (the caller's, read once by the listing) it can speak, by id. A model
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
    cloned: dict[str, list[str]] = {}
    for voice in saved:
        for model in service.cloning_models(voice):
            cloned.setdefault(model, []).append(voice.id)
    return {
        config.name: ModelVoices(list(dict.fromkeys([*voices.names, *config.voices, *cloned.get(config.name, [])])),
                                 voices.confirmed)
        for config, voices in zip(configs, listed, strict=True)
    }
