"""router.runners.http.HttpRunner against a scripted worker, for what a real one does too rarely to
test: answering slowly, stalling, sending a half sample, failing. Each test names what the worker
will do (a WorkerScript) before it asks. (The real router and Piper containers, wired by compose,
and a worker killed mid-stream: test_containers.py.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from enum import Enum, auto

import pytest
from anyio import to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from functions.config import ConfigError, ModelConfig
from functions.protocol import SynthesisRequest
from functions.worker import SynthesizeBody
from router.errors import BackendUnavailable, InvalidRequest, SynthesisFailed
from router.runners.http import HttpRunner
from tests.processes import free_port, serving

# --- HttpRunner against a scripted worker -------------------------------------------------

#: 0..255 repeated: any lost, repeated or reordered byte shows.
PATTERN = bytes(range(256)) * 64
#: Odd sizes, so that network reads split samples.
PIECES = (1, 333, 1000, 7, 4096, 2, 5001)
CONFIG = ModelConfig.model_validate(
    {
        "name": "clone",
        "backend": "piper",
        "parameters": {"model": "voice.onnx", "threads": 4},
        "tts": {"voice": "a", "vall-e": {"audio_path": "ref.wav"}},
        "voices": {"alloy": "a"},
    }
)


class WorkerScript(Enum):
    """What the scripted worker does with the next /synthesize request."""

    #: All of PATTERN in PIECES, 0.2 s apart: longer in all than a 1 s read time-out, no gap as long.
    STREAMS_SLOWLY = auto()
    #: As STREAMS_SLOWLY, but silent after the third piece until the test is over.
    STALLS_AFTER_THIRD_PIECE = auto()
    #: A 200 and PATTERN[:4000], then the connection ends without the chunked body's last chunk.
    DIES_MID_STREAM = auto()
    #: 1001 bytes and a clean end: the last sample is half of one.
    ENDS_ON_HALF_A_SAMPLE = auto()
    #: A 400 naming the voice (param "voice").
    REFUSES_THE_VOICE = auto()
    #: A 500: the model exploded.
    FAILS_WITH_500 = auto()
    #: A 503: the worker is still loading its models.
    IS_STILL_LOADING = auto()


#: The error each refusing script answers with: status, message, param.
WORKER_ERRORS = {
    WorkerScript.REFUSES_THE_VOICE: (400, "voice 'x' is not offered", "voice"),
    WorkerScript.FAILS_WITH_500: (500, "the model exploded", None),
    WorkerScript.IS_STILL_LOADING: (503, "the piper worker is still loading its models", None),
}


class ScriptedWorker:
    """A worker that answers /synthesize as its `script` says (set by `fresh`)."""

    def __init__(self) -> None:
        self.script: WorkerScript | None = None
        self.bodies: list[SynthesizeBody] = []
        #: scripts whose answer stopped early because the router went away, and those that ended
        self.abandoned: list[WorkerScript] = []
        self.finished: list[WorkerScript] = []
        self.healthy = True
        #: how many times the router asked for the voices
        self.voice_lists = 0
        #: set when a test is over: a stalled answer goes on (to nobody, by then)
        self.unstall = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/synthesize", self.synthesize, methods=["POST"]),
                Route("/voices", self.voices, methods=["POST"]),
            ]
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ready" if self.healthy else "loading"}, status_code=200 if self.healthy else 503)

    async def voices(self, request: Request) -> Response:
        self.voice_lists += 1
        return JSONResponse({"voices": ["a", "b"]})

    async def synthesize(self, request: Request) -> Response:
        body = SynthesizeBody.model_validate_json(await request.body())
        self.bodies.append(body)
        script = self.script
        if script is None:
            return error(500, "the test set no WorkerScript", None)
        if script in WORKER_ERRORS:
            return error(*WORKER_ERRORS[script])
        return StreamingResponse(
            self.watched(script),
            media_type="application/octet-stream",
            headers={"X-Sample-Rate": "16000", "X-Sample-Format": "s16le", "X-Channels": "1"},
        )

    async def watched(self, script: WorkerScript) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for piece in self.pieces(script):
                yield piece
            finished = True
        finally:
            (self.finished if finished else self.abandoned).append(script)

    async def pieces(self, script: WorkerScript) -> AsyncIterator[bytes]:
        if script is WorkerScript.ENDS_ON_HALF_A_SAMPLE:
            yield PATTERN[:1001]
            return
        if script is WorkerScript.DIES_MID_STREAM:
            yield PATTERN[:4000]
            await asyncio.sleep(0.2)
            # What a crashing worker does after its 200: the connection ends without the
            # chunked body's last chunk.
            raise RuntimeError("the worker died")
        assert script in (WorkerScript.STREAMS_SLOWLY, WorkerScript.STALLS_AFTER_THIRD_PIECE), script
        offset = 0
        for number, size in enumerate(PIECES):
            yield PATTERN[offset : offset + size]
            offset += size
            if script is WorkerScript.STALLS_AFTER_THIRD_PIECE and number == 2:
                # Silent for as long as the test runs: longer than any read time-out it sets.
                await to_thread.run_sync(self.unstall.wait, 120, abandon_on_cancel=True)
            await asyncio.sleep(0.2)
        yield PATTERN[offset:]


def error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": "x", "param": param}}, status_code=status)


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedWorker, str]]:
    worker = ScriptedWorker()
    with serving(worker.app, ready_path="/healthz", timeout=30) as url:
        yield worker, url


@contextmanager
def fresh(worker: ScriptedWorker, script: WorkerScript | None = None) -> Iterator[ScriptedWorker]:
    """`worker` as new, answering /synthesize as `script` says (a test that synthesizes nothing
    names none)."""
    worker.script = script
    worker.bodies.clear()
    worker.abandoned.clear()
    worker.finished.clear()
    worker.healthy = True
    worker.voice_lists = 0
    worker.unstall.clear()
    try:
        yield worker
    finally:
        worker.unstall.set()


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `condition` (the runner's view of its workers, which no event announces) until it
    holds; `timeout` is a hang guard only."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.01)


def request(text: str = "Hello there.") -> SynthesisRequest:
    return SynthesisRequest(model="clone", text=text, voice="a", speed=1.25)


async def collect(runner: HttpRunner, received: bytearray | None = None) -> tuple[int, list[bytes]]:
    """The sample rate and chunks of one request; `received` keeps what came before a failure."""
    chunks: list[bytes] = []
    try:
        stream = await runner.stream(CONFIG, request())
        async for chunk in stream.audio:
            chunks.append(chunk)
            if received is not None:
                received.extend(chunk)
        return stream.sample_rate, chunks
    finally:
        await runner.close()


@asynccontextmanager
async def running(runner: HttpRunner, *preload: ModelConfig) -> AsyncIterator[HttpRunner]:
    """`runner`, started with `preload` where given, and closed however the test ends."""
    try:
        if preload:
            await runner.start(list(preload))
        yield runner
    finally:
        await runner.close()


@pytest.mark.anyio
async def test_a_workers_voices_are_asked_once_until_it_goes_down(scripted) -> None:
    worker, url = scripted
    with fresh(worker):
        seen = []
        async with running(HttpRunner({"piper": url}, health_interval=0.1), CONFIG) as runner:
            for _ in range(3):
                seen.append((await runner.voices(CONFIG), worker.voice_lists))
            # Down and up again: it may have loaded other models since, so it is asked anew.
            worker.healthy = False
            await until(lambda: not runner.is_ready(), "the runner saw the worker go down")
            worker.healthy = True
            await until(runner.is_ready, "the runner saw the worker come back")
            seen.append((await runner.voices(CONFIG), worker.voice_lists))
        assert seen == [(["a", "b"], 1), (["a", "b"], 1), (["a", "b"], 1), (["a", "b"], 2)]


@pytest.mark.anyio
async def test_a_slow_worker_loses_and_repeats_nothing(scripted) -> None:
    worker, url = scripted
    with fresh(worker, WorkerScript.STREAMS_SLOWLY):
        # The whole answer takes longer than the read time-out; no single wait does.
        runner = HttpRunner({"piper": url}, read_timeout=1.0)
        rate, chunks = await collect(runner)
        assert rate == 16000
        assert b"".join(chunks) == PATTERN
        assert all(len(chunk) % 2 == 0 and chunk for chunk in chunks)
        assert len(worker.bodies) == 1
        # The worker got the config and request the router holds, field for field.
        assert worker.bodies[0].config == CONFIG
        assert worker.bodies[0].request == request()


@pytest.mark.anyio
async def test_a_stalled_worker_raises_from_the_iterator_without_a_retry(scripted) -> None:
    worker, url = scripted
    with fresh(worker, WorkerScript.STALLS_AFTER_THIRD_PIECE):
        runner = HttpRunner({"piper": url}, read_timeout=0.5)
        received = bytearray()
        with pytest.raises(SynthesisFailed, match="'piper' sent nothing for 0.5 s"):
            await collect(runner, received)
        assert PATTERN.startswith(bytes(received)) and 0 < len(received) < len(PATTERN)
        assert len(worker.bodies) == 1


@pytest.mark.anyio
async def test_a_worker_dying_mid_stream_raises_from_the_iterator(scripted) -> None:
    worker, url = scripted
    received = bytearray()
    with fresh(worker, WorkerScript.DIES_MID_STREAM), pytest.raises(SynthesisFailed, match="'piper' stopped mid-stream"):
        await collect(HttpRunner({"piper": url}), received)
    assert bytes(received) == PATTERN[:4000]
    assert len(worker.bodies) == 1


@pytest.mark.anyio
async def test_a_worker_dying_mid_stream_is_not_ready_until_a_probe_finds_it_back(scripted) -> None:
    worker, url = scripted
    with fresh(worker, WorkerScript.DIES_MID_STREAM):
        async with running(HttpRunner({"piper": url}, health_interval=3600), CONFIG) as runner:
            assert runner.is_ready()
            with pytest.raises(SynthesisFailed, match="stopped mid-stream"):
                await collect(runner)
            # Its last probe found it healthy; the broken stream is newer news.
            assert not runner.is_ready()
            await runner.workers.health("piper", url)
            assert runner.is_ready()


@pytest.mark.anyio
async def test_a_stream_closed_before_it_is_read_releases_the_worker(scripted) -> None:
    # What the router does with a chunk it fetched ahead when the client goes away first.
    worker, url = scripted
    with fresh(worker, WorkerScript.STREAMS_SLOWLY):
        async with running(HttpRunner({"piper": url})) as runner:
            stream = await runner.stream(CONFIG, request())
            await stream.audio.aclose()
            await until(lambda: bool(worker.abandoned or worker.finished), "the worker's answer ended")
        # Cut short, not streamed to its end to nobody.
        assert worker.abandoned == [WorkerScript.STREAMS_SLOWLY] and worker.finished == []


@pytest.mark.anyio
async def test_a_half_sample_at_the_end_is_an_error(scripted) -> None:
    worker, url = scripted
    with fresh(worker, WorkerScript.ENDS_ON_HALF_A_SAMPLE), pytest.raises(SynthesisFailed, match="truncated sample"):
        await collect(HttpRunner({"piper": url}))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("script", "raised", "message", "param"),
    [
        (WorkerScript.REFUSES_THE_VOICE, InvalidRequest, "voice 'x' is not offered", "voice"),
        (WorkerScript.FAILS_WITH_500, SynthesisFailed, "backend 'piper' failed: the model exploded", None),
        (
            WorkerScript.IS_STILL_LOADING,
            BackendUnavailable,
            "backend 'piper' is unavailable: the piper worker is still loading",
            None,
        ),
    ],
    ids=lambda value: value.name if isinstance(value, WorkerScript) else None,
)
async def test_worker_errors_become_router_errors(scripted, script, raised, message, param) -> None:
    worker, url = scripted
    with fresh(worker, script), pytest.raises(raised) as caught:
        await collect(HttpRunner({"piper": url}))
    assert caught.value.message.startswith(message) and caught.value.param == param


@pytest.mark.anyio
async def test_an_unreachable_worker_is_a_503_naming_the_backend() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with running(HttpRunner({"piper": url}, connect_timeout=2), CONFIG) as runner:
        assert not runner.is_ready()
        with pytest.raises(BackendUnavailable, match=f"backend 'piper' is unavailable: its worker at {url}"):
            await runner.stream(CONFIG, request())


@pytest.mark.anyio
async def test_a_backend_without_a_url_is_a_503_saying_where_to_set_it(scripted) -> None:
    _, url = scripted
    coqui = ModelConfig(name="xtts", backend="coqui")
    async with running(HttpRunner({"piper": url})) as runner:
        with pytest.raises(BackendUnavailable, match="'coqui' has no worker: add it to CHORUS_BACKEND_URLS"):
            await runner.stream(coqui, request())


async def readiness_follows(worker: ScriptedWorker, runner: HttpRunner) -> None:
    """The worker goes down, then comes back: the runner's readiness follows each."""
    worker.healthy = False
    await until(lambda: not runner.is_ready(), "readiness followed the worker going down")
    worker.healthy = True
    await until(runner.is_ready, "readiness followed the worker coming back")


@pytest.mark.anyio
async def test_readiness_follows_the_workers_healthz(scripted) -> None:
    worker, url = scripted
    # A model of another backend with no worker does not hold readiness back.
    other = ModelConfig(name="xtts", backend="coqui")
    with fresh(worker):
        runner = HttpRunner({"piper": url}, health_interval=0.05)
        assert not runner.is_ready()
        async with running(runner, CONFIG, other):
            assert runner.is_ready()
            await readiness_follows(worker, runner)


@pytest.mark.anyio
async def test_a_worker_never_reached_holds_readiness_back_only_when_it_is_the_only_one(scripted) -> None:
    # Compose's default profile: URLs for every backend, and only Piper's service running.
    worker, url = scripted
    absent = f"http://127.0.0.1:{free_port()}"
    other = ModelConfig(name="xtts", backend="coqui")
    with fresh(worker):
        runner = HttpRunner({"piper": url, "coqui": absent}, health_interval=0.05, connect_timeout=1)
        async with running(runner, CONFIG, other):
            # The absent worker holds nothing back: ready at once, and readiness follows Piper's.
            assert runner.is_ready()
            await readiness_follows(worker, runner)
            with pytest.raises(BackendUnavailable, match="backend 'coqui' is unavailable"):
                await runner.stream(other, request())


@pytest.mark.parametrize(
    ("urls", "message"),
    [({"pipr": "http://piper:9000"}, "unknown backend 'pipr'"), ({"piper": "piper:9000"}, "not an http")],
)
def test_bad_backend_urls_are_refused_at_start(urls: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HttpRunner(urls)


def test_settings_from_the_environment_reach_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.settings import Settings

    monkeypatch.setenv("CHORUS_MODE", "http")
    monkeypatch.setenv("CHORUS_BACKEND_URLS", "piper=http://piper:9000/, coqui=http://coqui:9000")
    monkeypatch.setenv("CHORUS_BACKEND_CONNECT_TIMEOUT", "1.5")
    monkeypatch.setenv("CHORUS_BACKEND_READ_TIMEOUT", "42")
    monkeypatch.setenv("CHORUS_BACKEND_HEALTH_INTERVAL", "0.5")
    runner = HttpRunner.from_settings(Settings.from_env())
    assert runner.backend_urls == {"piper": "http://piper:9000", "coqui": "http://coqui:9000"}
    assert runner.workers.read_timeout == 42 and runner.health_interval == 0.5
    assert runner.workers.client.timeout.connect == 1.5 and runner.workers.client.timeout.read == 42
