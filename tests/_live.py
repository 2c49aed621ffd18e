"""What the hardening tests share: the app served by real uvicorn on loopback (in a thread of the
test process, so a test can wrap the runner and watch the backend), a models directory holding
the bundled Piper voice, and a runner around the real in-process one that counts backend work
and injects faults on cue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from anyio import to_thread

from functions.config import ModelConfig
from functions.piper import install_bundled_voice
from functions.protocol import SynthesisRequest
from router.api.common import is_elevenlabs_client
from router.app import create_app
from router.errors import SynthesisFailed
from router.registry import ModelRegistry
from router.runners import PcmStream, Runner
from router.runners.local import InProcessRunner
from router.settings import Settings
from tests.processes import free_port, serving

#: Words that make ScriptedRunner misbehave on the chunk that contains them.
RAISE, HANG, DIE, SILENT = "Kaboom", "Standstill", "Dropout", "Hush"


def write_config(configs_dir: Path, name: str = "tts-1", **deploy: object) -> Path:
    configs_dir.mkdir(parents=True, exist_ok=True)
    path = configs_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "backend": "piper",
        "parameters": {"model": "en_US-joe-medium.onnx", "language": "en"},
        "deploy": {"max_concurrent_inputs": 4, **deploy},
    }))
    return path


def piper_setup(root: Path, **deploy: object) -> tuple[Path, Path]:
    """A models directory with the bundled voice and a configs directory with one Piper model."""
    models = root / "models"
    install_bundled_voice(models)
    configs = root / "configs"
    write_config(configs, **deploy)
    return configs, models


class ScriptedRunner(Runner):
    """The real InProcessRunner (real Piper), plus: a count of chunk syntheses begun and of the
    PCM pieces the backend made; the most chunk streams open at once; the PCM of each chunk; and
    faults on cue (RAISE: fails before any audio; HANG: blocks a worker thread before any audio
    until `release` is set; DIE: fails after this chunk's audio; SILENT: makes no sound at all)."""

    def __init__(self, models_dir: Path, chunk_delay: dict[str, float] | None = None):
        self.inner = InProcessRunner(models_dir)
        self.begun = 0
        self.pieces = 0
        self.open = 0
        self.most_open = 0
        self.pcm_by_text: dict[str, bytes] = {}
        self.release = threading.Event()
        #: text -> seconds to wait before its first piece (to reorder completions)
        self.chunk_delay = chunk_delay or {}

    async def start(self, preload: list[ModelConfig]) -> None:
        await self.inner.start(preload)

    def is_ready(self) -> bool:
        return self.inner.is_ready()

    async def voices(self, config: ModelConfig) -> list[str]:
        return await self.inner.voices(config)

    async def close(self) -> None:
        self.release.set()
        await self.inner.close()

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        self.begun += 1
        if RAISE in request.text:
            raise SynthesisFailed("backend 'piper' failed: scripted crash")
        real = await self.inner.stream(config, request)
        return PcmStream(real.sample_rate, self._chunks(real.chunks, request.text))

    async def _chunks(self, chunks: AsyncIterator[bytes], text: str) -> AsyncIterator[bytes]:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            if HANG in text:
                await to_thread.run_sync(self.release.wait, 60)
            await asyncio.sleep(self.chunk_delay.get(text, 0))
            made = b""
            async for pcm in chunks:
                self.pieces += 1
                made += pcm
                if SILENT not in text:
                    yield pcm
            self.pcm_by_text[text] = made
            if DIE in text:
                raise SynthesisFailed("backend 'piper' failed: the worker died mid-stream")
        finally:
            self.open -= 1
            await chunks.aclose()  # type: ignore[attr-defined]


@contextmanager
def live_app(
    configs: Path, models: Path, runner: Runner | None = None, **settings: object
) -> Iterator[str]:
    """create_app(...) served by real uvicorn on a free loopback port; yields its URL once
    /readyz answers 200, and stops the server afterwards whatever happens."""
    port = free_port()
    config = Settings(configs_dir=configs, models_dir=models, port=port, **settings)
    registry = ModelRegistry.from_dir(configs, models)
    app = create_app(config, registry, runner or InProcessRunner(models))
    with serving(app, port=port) as url:
        try:
            yield url
        finally:
            # A HANG request holds a worker thread: let it go so that the server can stop.
            if isinstance(runner, ScriptedRunner):
                runner.release.set()


def family_of(request: httpx.Request) -> str:
    path = request.url.path
    if path == "/v1/models" and is_elevenlabs_client(request.headers):
        return "elevenlabs"  # the one path both APIs own: ElevenLabs clients get their shape
    if path.startswith(("/v1/text-to-speech", "/v1/voices", "/v2/voices", "/v1/sound-generation")):
        return "elevenlabs"
    if path.startswith("/tts"):
        return "localai"
    return "openai"


def assert_family_error(response: httpx.Response, status: int | None = None) -> dict:
    """`response` is an error (of `status` if given) in the shape its API family uses."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    family = family_of(response.request)
    if family == "elevenlabs":
        assert list(body) == ["detail"], body
        assert set(body["detail"]) == {"status", "message"} and body["detail"]["message"], body
        return body["detail"]
    assert list(body) == ["error"], body
    error = body["error"]
    if family == "localai":
        assert set(error) == {"code", "message", "type"} and error["code"] == response.status_code, body
    else:
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == ("invalid_request_error" if response.status_code < 500 else "server_error")
    assert error["message"], body
    return error
