"""What the hardening tests share: the app served by real uvicorn on loopback (in a thread of the
test process, so a test can wrap the runner and watch the backend), a models directory holding
the bundled Piper voice, and a runner around the real in-process one that counts backend work
and injects faults on cue."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
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
    """The real InProcessRunner (real Piper), plus: a count of chunk syntheses begun (and their
    texts) and of the PCM pieces the backend made (word times, where asked for, pass through
    uncounted); the chunk streams open now and the most open at once; the requests holding the
    model now (Runner.hold) and in all; the PCM of each chunk;
    faults on cue (RAISE: fails before any audio; HANG: blocks a worker thread before any audio
    until `release` is set; DIE: fails after this chunk's audio; SILENT: makes no sound at all);
    and gates: a chunk whose text holds a text of `gated` (the whole chunk, or a phrase of it where
    the chunker's cuts are not the test's to know) waits before its first piece until the test
    opens that gate, so that a test can hold a synthesis at a known point, do something, and let
    it go on.

    The server runs in a thread of its own: every figure changes under one lock, and the test
    waits on them (`wait_until`, `wait_begun`, `wait_idle`, `wait_at_gate`) instead of sleeping."""

    #: How long a gated chunk waits for its gate before failing its request: a hang guard only.
    GATE_TIMEOUT = 120

    def __init__(self, models_dir: Path, gated: Iterable[str] = ()):
        self.inner = InProcessRunner(models_dir)
        self._changed = threading.Condition()
        self.begun = 0
        #: the text of each chunk synthesis begun, in order
        self.begun_texts: list[str] = []
        self.pieces = 0
        self.open = 0
        self.most_open = 0
        #: requests holding the model now, and hold() calls in all
        self.holding = 0
        self.holds = 0
        self.pcm_by_text: dict[str, bytes] = {}
        self.release = threading.Event()
        self.gates = {text: threading.Event() for text in gated}
        #: gated chunks waiting at their gate now, by text
        self.at_gate: Counter[str] = Counter()

    # -- what a test waits on ------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], bool], timeout: float = 60, what: str = "the runner's state") -> None:
        """Until `condition()` holds (it reads this runner's figures); fails after `timeout`
        seconds, a hang guard, saying where the runner stood."""
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise AssertionError(f"{what}: not reached within {timeout} s ({self.state()})")

    def begun_with(self, mark: str) -> int:
        """How many chunk syntheses begun so far hold `mark` in their text."""
        with self._changed:
            return sum(mark in text for text in self.begun_texts)

    def wait_begun(self, count: int, timeout: float = 60) -> None:
        self.wait_until(lambda: self.begun >= count, timeout, f"{count} chunk syntheses begun")

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no request holds the model and no chunk stream is open: every synthesis has
        ended server-side (finished, failed or stopped)."""
        self.wait_until(lambda: self.holding == 0 and self.open == 0, timeout, "an idle backend")

    def wait_at_gate(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until `count` chunks of `text` wait at its gate."""
        self.wait_until(lambda: self.at_gate[text] >= count, timeout, f"{count} chunk(s) at the gate of {text!r}")

    def open_gate(self, text: str) -> None:
        self.gates[text].set()

    def open_all(self) -> None:
        self.release.set()
        for gate in self.gates.values():
            gate.set()

    def state(self) -> str:
        waiting = {text: n for text, n in self.at_gate.items() if n}
        return (f"begun {self.begun}, open {self.open}, holding {self.holding}, pieces {self.pieces}, "
                f"at gates {waiting}")

    def _note(self, **changes: int) -> None:
        with self._changed:
            for name, delta in changes.items():
                setattr(self, name, getattr(self, name) + delta)
            self.most_open = max(self.most_open, self.open)
            self._changed.notify_all()

    # -- the runner ----------------------------------------------------------------------------

    async def start(self, preload: list[ModelConfig]) -> None:
        await self.inner.start(preload)

    def is_ready(self) -> bool:
        return self.inner.is_ready()

    async def voices(self, config: ModelConfig) -> list[str]:
        return await self.inner.voices(config)

    async def close(self) -> None:
        self.open_all()
        await self.inner.close()

    def hold(self, config: ModelConfig) -> Callable[[], None]:
        let_go = self.inner.hold(config)
        self._note(holding=1, holds=1)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                let_go()
                self._note(holding=-1)

        return release

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        with self._changed:
            self.begun_texts.append(request.text)
        self._note(begun=1)
        if RAISE in request.text:
            raise SynthesisFailed("backend 'piper' failed: scripted crash")
        real = await self.inner.stream(config, request)
        return PcmStream(real.sample_rate, self._chunks(real.audio, request.text))

    async def _chunks(self, chunks: Stream[bytes], text: str) -> AsyncIterator[bytes]:
        self._note(open=1)
        try:
            if HANG in text:
                await to_thread.run_sync(self.release.wait, 60)
            gate = next((key for key in self.gates if key in text), None)
            if gate is not None:
                await self._wait_at_gate(gate)
            made = b""
            async for pcm in chunks:
                if not isinstance(pcm, bytes):
                    yield pcm  # the word times a request for them gets (the WebSockets' do)
                    continue
                self._note(pieces=1)
                made += pcm
                if SILENT not in text:
                    yield pcm
            with self._changed:
                self.pcm_by_text[text] = made
            if DIE in text:
                raise SynthesisFailed("backend 'piper' failed: the worker died mid-stream")
        finally:
            self._note(open=-1)
            await chunks.aclose()

    async def _wait_at_gate(self, text: str) -> None:
        with self._changed:
            self.at_gate[text] += 1
            self._changed.notify_all()
        try:
            # Abandoned if the request goes away meanwhile: a closed stream stops at once.
            opened = await to_thread.run_sync(self.gates[text].wait, self.GATE_TIMEOUT, abandon_on_cancel=True)
        finally:
            with self._changed:
                self.at_gate[text] -= 1
                self._changed.notify_all()
        if not opened:
            raise SynthesisFailed(f"backend 'piper' failed: the test never opened the gate of {text!r}")


class Arrivals:
    """The HTTP requests that have reached the app, by path (counted as they enter it, before
    anything is done with them): a test waits until a request it sent from another thread is
    in the server."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count: Counter[str] = Counter()

    def wrap(self, app: Any) -> Any:
        async def counted(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                with self._changed:
                    self.count[scope["path"]] += 1
                    self._changed.notify_all()
            await app(scope, receive, send)

        return counted

    def wait(self, path: str, count: int, timeout: float = 60) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count[path] >= count, timeout):
                raise AssertionError(f"{count} requests to {path} did not arrive within {timeout} s "
                                     f"({self.count[path]} did)")


@contextmanager
def live_app(
    configs: Path, models: Path, runner: Runner | None = None, arrivals: Arrivals | None = None,
    **settings: object,
) -> Iterator[str]:
    """create_app(...) served by real uvicorn on a free loopback port; yields its URL once
    /readyz answers 200, and stops the server afterwards whatever happens. `arrivals`, if
    given, counts the requests that reach the app."""
    port = free_port()
    config = Settings(configs_dir=configs, models_dir=models, port=port, **settings)
    registry = ModelRegistry.from_dir(configs, models)
    app = create_app(config, registry, runner or InProcessRunner(models))
    with serving(app if arrivals is None else arrivals.wrap(app), port=port) as url:
        try:
            yield url
        finally:
            # A HANG or gated request holds a worker thread: let it go so that the server can stop.
            if isinstance(runner, ScriptedRunner):
                runner.open_all()


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
