"""Pipecat's own TTS services, unchanged and at their default settings, pointed at a real Chorus:
ElevenLabsTTSService (the multi-stream-input socket), ElevenLabsHttpTTSService
(`/stream/with-timestamps`) and OpenAITTSService (`/v1/audio/speech`). Only what must name Chorus
is set: the URL, the voice, and for ElevenLabs the model (its own model names mean nothing to
Chorus).

Each service runs as a Pipecat app runs it, in a pipeline of its own (no transport, no LLM, no
network but loopback): the test stands in for the LLM, queueing an LLMFullResponseStartFrame, the
reply's words as LLMTextFrames and an LLMFullResponseEndFrame, and for the user, queueing an
InterruptionFrame for a barge-in; a processor after the service collects what it pushes. Pipecat's
own log (loguru) is captured: a warning or error in it fails the test."""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from anyio import to_thread

from tests._agents import (
    HELD_SENTENCE,
    LONG_MARK,
    LONG_REPLY,
    REPLY,
    SENTENCE_CHUNKS,
    VOICE,
    assert_whole,
    http_seconds,
)
from tests._live import ScriptedRunner, live_app, piper_setup

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("pipecat")
from loguru import logger  # noqa: E402
from openai import DefaultAsyncHttpxClient  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService, ElevenLabsTTSService  # noqa: E402
from pipecat.services.openai.tts import OpenAITTSService  # noqa: E402
from pipecat.services.tts_service import TTSService  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

pytestmark = pytest.mark.anyio

#: The output rates Pipecat's ElevenLabs services can ask for (each as pcm_<rate>, the only
#: encoding they use); Pipecat's default is 24 kHz, PipelineParams' audio_out_sample_rate.
ELEVENLABS_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
DEFAULT_RATE = 24000


def rate_id(rate: int) -> str:
    return f"{rate}-default" if rate == DEFAULT_RATE else str(rate)


@dataclass
class Reply:
    """What the service pushed downstream for one reply."""

    pcm: bytes = b""
    rates: set[int] = field(default_factory=set)
    words: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / next(iter(self.rates)) if self.rates else 0.0


class Collector(FrameProcessor):
    """After the service: each reply's audio and words, up to its LLMFullResponseEndFrame (or the
    InterruptionFrame that cut it short)."""

    def __init__(self) -> None:
        super().__init__()
        self.reply = Reply()
        self.ended: asyncio.Queue[Reply] = asyncio.Queue()
        self.first_audio = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, TTSAudioRawFrame):
                self.reply.pcm += frame.audio
                self.reply.rates.add(frame.sample_rate)
                self.first_audio.set()
            elif isinstance(frame, TTSTextFrame):
                self.reply.words.append(frame.text)
            elif isinstance(frame, (LLMFullResponseEndFrame, InterruptionFrame)):
                self.ended.put_nowait(self.reply)
                self.reply = Reply()
        await self.push_frame(frame, direction)


class ErrorCollector(FrameProcessor):
    """Before the service: the errors it pushes upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.UPSTREAM and isinstance(frame, ErrorFrame):
            self.errors.append(frame.error)
        await self.push_frame(frame, direction)


class Agent:
    """One TTS service in a running pipeline, spoken to as an LLM speaks to it."""

    def __init__(self, worker: PipelineWorker, run: asyncio.Future, collector: Collector,
                 errors: ErrorCollector) -> None:
        self.worker, self.run, self.collector, self.errors = worker, run, collector, errors

    async def say(self, text: str) -> None:
        """The reply as an LLM streams it: its start, its words (a token each, with the space
        before it), its end."""
        words = text.split(" ")
        frames: list[Frame] = [LLMFullResponseStartFrame()]
        frames += [LLMTextFrame(word if i == 0 else f" {word}") for i, word in enumerate(words)]
        frames.append(LLMFullResponseEndFrame())
        await self.worker.queue_frames(frames)

    async def reply(self, text: str) -> Reply:
        """`text` said, and what the service made of it once the reply has ended."""
        self.collector.first_audio.clear()
        await self.say(text)
        return await self.collector.ended.get()

    async def interrupt(self) -> None:
        """The user starts speaking: Pipecat's barge-in."""
        self.collector.first_audio.clear()
        await self.worker.queue_frame(InterruptionFrame())
        await self.collector.ended.get()

    async def hang_up(self) -> None:
        """The call ends: the pipeline is cancelled, and the service disconnects."""
        await self.worker.cancel()
        await self.run


@asynccontextmanager
async def running(service: TTSService, rate: int | None = None):
    """`service` in a pipeline [errors, service, collector] run by a WorkerRunner, as pipecat's
    own test utilities build one; ended with an EndFrame (cancelled if the test failed)."""
    collector, errors = Collector(), ErrorCollector()
    params = PipelineParams() if rate is None else PipelineParams(audio_out_sample_rate=rate)
    worker = PipelineWorker(Pipeline([errors, service, collector]), params=params, cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker, frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    try:
        await started.wait()
        yield Agent(worker, run, collector, errors)
        if not run.done():
            await worker.stop_when_done()
            await run
    finally:
        if not run.done():
            await worker.cancel()
            await run


class PipecatLog:
    """Pipecat's log records (loguru's), every level, and a way to wait for one."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._waits: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []

    def sink(self, message) -> None:
        record = message.record
        self.records.append(record)
        for pattern, found in self._waits:
            if (match := pattern.search(record["message"])) and not found.done():
                found.get_loop().call_soon_threadsafe(lambda f=found, m=match: f.done() or f.set_result(m))

    async def logged(self, pattern: str) -> re.Match[str]:
        """The first message (logged so far, or from now on) matching `pattern`."""
        compiled = re.compile(pattern)
        for record in list(self.records):
            if match := compiled.search(record["message"]):
                return match
        found: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        self._waits.append((compiled, found))
        try:
            return await found
        finally:
            self._waits.remove((compiled, found))

    def problems(self) -> list[str]:
        return [f"{r['level'].name} {r['name']}: {r['message']}" for r in self.records if r["level"].no >= 30]


@pytest.fixture
def pipecat_log():
    log = PipecatLog()
    handler = logger.add(log.sink, level="TRACE", filter="pipecat")
    try:
        yield log
    finally:
        logger.remove(handler)


def assert_clean(agent: Agent, log: PipecatLog) -> None:
    """The service pushed no error and Pipecat logged no warning."""
    assert not agent.errors.errors, f"the service pushed errors: {agent.errors.errors}"
    problems = log.problems()
    assert not problems, f"Pipecat logged {len(problems)} warnings or errors: {problems}"


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1)


def eleven_ws(url: str) -> ElevenLabsTTSService:
    return ElevenLabsTTSService(api_key="not-needed", url=ws_url(url),
                                settings=ElevenLabsTTSService.Settings(voice=VOICE, model="tts-1"))


def eleven_http(url: str, session: aiohttp.ClientSession) -> ElevenLabsHttpTTSService:
    return ElevenLabsHttpTTSService(api_key="not-needed", base_url=url, aiohttp_session=session,
                                    settings=ElevenLabsHttpTTSService.Settings(voice=VOICE, model="tts-1"))


def assert_words(reply: Reply, text: str) -> None:
    assert " ".join(reply.words).split() == text.split(), reply.words


# --- Each service at its defaults, speaking a reply in full --------------------------------


@pytest.mark.parametrize("rate", ELEVENLABS_RATES, ids=rate_id)
async def test_pipecat_elevenlabs_websocket_speaks_a_reply_whole(server, pipecat_log, rate):
    """ElevenLabsTTSService: multi-stream-input?model_id=...&output_format=pcm_<rate>&auto_mode=true;
    each sentence as it completes, then {"flush": true} and {"close_context": true}."""
    reference = await http_seconds(server.url, REPLY)
    with anyio.fail_after(60):
        async with running(eleven_ws(server.url), rate) as agent:
            reply = await agent.reply(REPLY)
    assert reply.rates == {rate}
    assert_whole(reply.seconds, reference, f"Pipecat's ElevenLabsTTSService (pcm_{rate})")
    assert_words(reply, REPLY)
    assert_clean(agent, pipecat_log)


@pytest.mark.parametrize("rate", ELEVENLABS_RATES, ids=rate_id)
async def test_pipecat_elevenlabs_http_speaks_a_reply_whole(server, pipecat_log, rate):
    """ElevenLabsHttpTTSService: one POST .../stream/with-timestamps?output_format=pcm_<rate> per
    sentence; every NDJSON line's alignment is read (an empty one is logged as a warning)."""
    reference = await http_seconds(server.url, REPLY)
    async with aiohttp.ClientSession() as session:
        with anyio.fail_after(60):
            async with running(eleven_http(server.url, session), rate) as agent:
                reply = await agent.reply(REPLY)
    assert reply.rates == {rate}
    assert_whole(reply.seconds, reference, f"Pipecat's ElevenLabsHttpTTSService (pcm_{rate})")
    assert_words(reply, REPLY)
    assert_clean(agent, pipecat_log)


async def test_pipecat_openai_speaks_a_reply_whole(server, pipecat_log):
    """OpenAITTSService at its defaults: gpt-4o-mini-tts, voice alloy, response_format pcm
    (24 kHz, the only rate it takes), one POST /v1/audio/speech per sentence."""
    reference = await http_seconds(server.url, REPLY)
    # The SDK's own default client, closed on this test's loop: the service never closes its
    # client, and the SDK's finaliser would close it on whichever test's loop collects it.
    with anyio.fail_after(60):
        async with DefaultAsyncHttpxClient() as http, \
                running(OpenAITTSService(api_key="not-needed", base_url=f"{server.url}/v1", http_client=http)) as agent:
            reply = await agent.reply(REPLY)
    assert reply.rates == {24000}
    assert_whole(reply.seconds, reference, "Pipecat's OpenAITTSService")
    assert_clean(agent, pipecat_log)


# --- Barge-in ------------------------------------------------------------------------------


async def test_pipecat_barge_in_after_a_closed_reply_stops_the_backend(tmp_path, pipecat_log):
    """Pipecat ends every reply with {"flush": true} and {"close_context": true}; when the user
    barges in it closes the context again. That second close_context comes while the reply is
    still being made: the backend stops within one chunk, and the next reply on the same
    service (the same socket) speaks whole."""
    configs, models = piper_setup(tmp_path)
    runner = ScriptedRunner(models, gated=[HELD_SENTENCE])
    with live_app(configs, models, runner, chunk_chars=SENTENCE_CHUNKS) as url:
        reference = await http_seconds(url, REPLY)
        with anyio.fail_after(180):
            async with running(eleven_ws(url)) as agent:
                await agent.say(LONG_REPLY)
                await agent.collector.first_audio.wait()
                # The reply was flushed and closed before the barge-in.
                context = (await pipecat_log.logged(r"Closing context (\S+)")).group(1)
                await to_thread.run_sync(runner.wait_at_gate, HELD_SENTENCE)
                begun = runner.begun_with(LONG_MARK)
                await agent.interrupt()
                # The server's final message for the interrupted context ends its work there.
                await pipecat_log.logged(rf"Received final message for context {re.escape(context)}$")
                after = runner.begun_with(LONG_MARK)
                assert after <= begun + 1, (f"{begun} chunks of the interrupted reply were begun at the barge-in, "
                                            f"{after} by its final message")
                following = await agent.reply(REPLY)
    assert_whole(following.seconds, reference, "the reply after the barge-in")
    assert_clean(agent, pipecat_log)


async def test_pipecat_hang_up_mid_reply_stops_the_backend(tmp_path, pipecat_log):
    """The call ends while a reply is spoken: Pipecat cancels its pipeline, which sends
    {"close_socket": true} and waits (up to 2 s) for the server to close. The backend stops
    within one chunk of the close_socket: by the time Pipecat has given up on the socket, and
    after."""
    configs, models = piper_setup(tmp_path)
    runner = ScriptedRunner(models, gated=[HELD_SENTENCE])
    with live_app(configs, models, runner, chunk_chars=SENTENCE_CHUNKS) as url:
        await http_seconds(url, REPLY)  # the model loaded: the reply's first audio comes at once
        with anyio.fail_after(180):
            async with running(eleven_ws(url)) as agent:
                await agent.say(LONG_REPLY)
                await agent.collector.first_audio.wait()
                await to_thread.run_sync(runner.wait_at_gate, HELD_SENTENCE)
                begun = runner.begun_with(LONG_MARK)
                await agent.hang_up()
            at_close = runner.begun_with(LONG_MARK)
            await to_thread.run_sync(runner.wait_idle)
            after = runner.begun_with(LONG_MARK)
    assert at_close <= begun + 1 and after <= begun + 1, (
        f"{begun} chunks of the reply were begun at the close_socket, {at_close} once Pipecat had closed the "
        f"socket, {after} in all")
