"""functions.serving.in_threads, the thread hop shared by local mode, the worker and Modal mode: a request cancelled
while its backend is inside a chunk leaves that chunk to finish, and only then closes the
backend's generator (closing it under the running thread raised, and at times crashed the
interpreter)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio import CapacityLimiter

from functions.config import ModelConfig
from functions.protocol import Backend, SynthesisRequest
from functions.serving import LoadedBackend


class Blocking(Backend):
    """Holds its first chunk until `release` is set; records how its generator ended."""

    name = "blocking"

    def __init__(self) -> None:
        super().__init__(ModelConfig(name="blocking", backend="piper"), Path("."))
        self.inside = threading.Event()
        self.release = threading.Event()
        self.ended: list[str] = []
        #: set once the generator has ended, however
        self.over = threading.Event()

    def load(self) -> None:
        pass

    @property
    def sample_rate(self) -> int:
        return 16000

    def voices(self) -> list[str]:
        return []

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        try:
            self.inside.set()
            self.release.wait(60)  # a hang guard: the test sets it
            yield b"\0\0" * 160
            yield b"\0\0" * 160
            self.ended.append("exhausted")
        except GeneratorExit:
            self.ended.append(f"closed in {threading.current_thread().name}")
            raise
        finally:
            self.over.set()


@pytest.mark.anyio
async def test_a_cancelled_hop_closes_the_generator_once_the_thread_is_out():
    async def scenario() -> tuple[BaseException | None, list[str], list[str]]:
        backend = Blocking()
        loaded = LoadedBackend(backend, CapacityLimiter(1))

        async def consume() -> None:
            async for _ in loaded.chunks(SynthesisRequest(model="blocking", text="hi")):
                pass

        task = asyncio.ensure_future(consume())
        assert await asyncio.to_thread(backend.inside.wait, 60)
        task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        before_release = list(backend.ended)
        backend.release.set()
        assert await asyncio.to_thread(backend.over.wait, 60), "the generator was never closed"
        return outcome, before_release, backend.ended

    outcome, before_release, ended = await scenario()
    # The request is cancelled cleanly, not failed by closing a generator that was running.
    assert isinstance(outcome, asyncio.CancelledError), outcome
    assert before_release == [], "the generator was touched while its thread was inside it"
    # Closed after its chunk, once, and off the event loop (a backend's close may block).
    assert len(ended) == 1 and ended[0].startswith("closed in "), ended
    assert ended != [f"closed in {threading.main_thread().name}"]
