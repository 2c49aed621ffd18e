"""One synthesis, one owner: from the first chunk of its text to the last of its audio.

A `Synthesis` holds everything a request uses while it is spoken: the chunks of its text (read as
they arrive), its place among its model's syntheses (the admission slot) and the runner's hold
on the backend, the backend streams of its chunks (fanned out, `deploy.fan_out` at once), and its
metrics. The speech service opens it; `aclose()` releases all of it exactly once, however it
ends: done, its client gone, an error, a time-out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from functions import PROMPT_BACKENDS
from functions.protocol import SynthesisRequest, WordTimes
from functions.streams import Stream, primed, released_by
from router import text as rules
from router.admission import Admission, Slot
from router.chunking import TextChunks
from router.errors import BackendTimeout, ChorusError, InvalidRequest, Overloaded, SynthesisFailed
from router.fan_out import FanOut
from router.metrics import Metrics
from router.runners import PcmStream, Runner
from router.stalls import with_stall_timeout

if TYPE_CHECKING:
    from router.speech import SpeechJob

#: Called as each text chunk's audio is complete: (chunks done, chunks in all or 0 where not
#: known, its seconds of audio). Long-text tools show progress with it.
ChunkDone = Callable[[int, int, float], None]


@dataclass(frozen=True)
class AudioStep:
    """One step of a synthesis's audio: PCM of chunk number `chunk` (its text `text`), the word
    times its backend measured, or (`ended`) the end of that chunk's audio."""

    chunk: int
    text: str
    pcm: bytes = b""
    words: WordTimes | None = None
    ended: bool = False


class Synthesis:
    """A job's audio, chunk by chunk and in order (a Stream of AudioStep), and everything it
    holds while it is made. `open()` raises, having released what it took, when the text, the
    model's queue or the backend refuses."""

    def __init__(self, job: SpeechJob, runner: Runner, admission: Admission, metrics: Metrics,
                 chunk_chars: int, on_chunk: ChunkDone | None = None):
        config = job.config
        self.job = job
        self._runner, self._admission, self._metrics, self._on_chunk = runner, admission, metrics, on_chunk
        # A prompt cut in two would describe two other sounds.
        self.chunks = TextChunks(job.text if job.fragments is None else job.fragments, chunk_chars,
                                 config.backend not in PROMPT_BACKENDS, job.limit, job.text_param)
        self.sample_rate = 0
        self._slot: Slot | None = None
        self._held: Callable[[], None] | None = None
        self._fan_out: FanOut | None = None
        self._steps: Stream[AudioStep] | None = None
        self._released = False

    @property
    def text(self) -> str:
        """The text so far, as its chunks were cut from it: all of it once the audio has ended."""
        return self.chunks.text

    def no_audio(self) -> ChorusError:
        """The error for a text none of whose chunks made a sound: without a letter or digit
        the text was the problem (400); otherwise the voice failed on ordinary text (500)."""
        name, param = self.job.config.name, self.job.text_param
        if not rules.speakable(self.text):
            return InvalidRequest(f"'{param}' has nothing model '{name}' can speak: it holds no letters or "
                                  "digits", param=param)
        return SynthesisFailed(f"model '{name}' produced no audio")

    async def open(self) -> None:
        """The first chunk of text, a place among the model's syntheses, and the first chunk's
        audio begun (its errors surface here, before a response is sent)."""
        try:
            first = await self.chunks.next()
            if first is None:
                raise self.no_audio()
            await self._take_place()
            try:
                stream = await self._open_chunk(first)
            except ChorusError as exc:
                self._metrics.backend_errors.labels(self.job.metric_name, exc.code).inc()
                raise
        except BaseException:
            await self._release()
            raise
        self.sample_rate = stream.sample_rate
        self._fan_out = FanOut(self.chunks, first, stream, self.job.config.deploy.fan_out, self._open_chunk)
        steps = released_by(self._all_steps(), self._release)
        self._steps = steps
        head = await anext(steps, None)  # a failure has released everything
        if head is not None:
            self._steps = primed(head, steps)

    async def _take_place(self) -> None:
        config = self.job.config
        # A request holds as many of the model's places as chunks it synthesises at once.
        places = max(1, self._runner.capacity(config) // config.deploy.fan_out)
        try:
            self._slot = await self._admission.gate(config.name, config.backend, places).enter()
        except Overloaded:
            self._metrics.rejected.labels(self.job.metric_name).inc()
            raise
        # Held between chunks too: docker mode stops no worker a request is still using.
        self._held = self._runner.hold(config)

    def __aiter__(self) -> Synthesis:
        return self

    async def __anext__(self) -> AudioStep:
        if self._steps is None:
            raise StopAsyncIteration
        return await anext(self._steps)

    async def aclose(self) -> None:
        """Releases everything the synthesis holds; once, whoever calls it first."""
        if self._steps is not None:
            await self._steps.aclose()  # its end releases
        await self._release()

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._slot is not None:
                self._slot.leave()
            if self._held is not None:
                self._held()
            if self._fan_out is not None:
                self._fan_out.close()
        finally:
            await self.chunks.aclose()

    async def _open_chunk(self, text: str) -> PcmStream:
        """One chunk's PCM stream, failing if the backend stalls longer than deploy.timeout."""
        config, seconds = self.job.config, self.job.config.deploy.timeout
        request: SynthesisRequest = self.job.request.model_copy(update={"text": text})
        try:
            async with asyncio.timeout(seconds):
                stream = await self._runner.stream(config, request)
        except TimeoutError:
            raise BackendTimeout(f"model '{config.name}' did not start within {seconds} s") from None
        return PcmStream(stream.sample_rate, with_stall_timeout(stream.audio, seconds, config.name))

    async def _all_steps(self) -> AsyncIterator[AudioStep]:
        assert self._fan_out is not None
        name = self.job.metric_name
        started, samples = time.perf_counter(), 0
        try:
            async with aclosing(self._fan_out.streams()) as streams:
                done = 0
                async for text, stream in streams:
                    made = [0]  # bytes of this chunk's PCM
                    async with aclosing(self._chunk_steps(done, text, stream, made)) as steps:
                        async for step in steps:
                            yield step
                    samples += made[0] // 2
                    seconds = made[0] / 2 / self.sample_rate
                    self._metrics.audio_seconds.labels(name).inc(seconds)
                    done += 1
                    if self._on_chunk is not None:
                        self._on_chunk(done, self.chunks.total or 0, seconds)
            if samples:
                rtf = (time.perf_counter() - started) / (samples / self.sample_rate)
                self._metrics.real_time_factor.labels(name).observe(rtf)
        except ChorusError as exc:
            self._metrics.backend_errors.labels(name, exc.code).inc()
            raise

    async def _chunk_steps(self, done: int, text: str, stream: PcmStream, made: list[int]) -> AsyncIterator[AudioStep]:
        """Chunk number `done`'s audio, then its end; `made` counts its PCM's bytes."""
        if stream.sample_rate != self.sample_rate:
            raise SynthesisFailed("the backend changed its sample rate mid-stream")
        async with aclosing(stream.audio) as audio:
            async for item in audio:
                if isinstance(item, WordTimes):
                    yield AudioStep(done, text, words=item)
                else:
                    made[0] += len(item)
                    yield AudioStep(done, text, pcm=item)
        yield AudioStep(done, text, ended=True)
