"""functions.serving.in_threads, the thread hop shared by local mode, the worker and Modal mode: a request cancelled
while its backend is inside a chunk leaves that chunk to finish, and only then closes the
backend's generator (closing it under the running thread raised, and at times crashed the
interpreter). And the memory release they share: once no synthesis runs, the backends are asked
to give their memory back, once per idle spell."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio import CapacityLimiter

from functions.config import ModelConfig
from functions.protocol import Backend, SynthesisRequest
from functions.serving import LoadedBackend, MemoryRelease


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

    def release_memory(self) -> None:
        self.ended.append("memory given back")

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


@pytest.mark.anyio
async def test_memory_is_given_back_once_no_synthesis_runs_and_once_per_idle_spell():
    backend = Blocking()
    backend.release.set()
    memory = MemoryRelease(0, lambda: [backend])
    loaded = LoadedBackend(backend, CapacityLimiter(2), memory)

    def given_back() -> int:
        return backend.ended.count("memory given back")

    async def until_given_back(count: int) -> None:
        # The release runs in a worker thread: each turn of the loop lets its end be seen.
        while memory.releases < count:
            await asyncio.sleep(0)

    first, second = (loaded.chunks(SynthesisRequest(model="blocking", text="hi")) for _ in range(2))
    await anext(first)
    await anext(second)
    await first.aclose()
    # The other synthesis still runs: nothing is given back under it, nor set to be.
    assert memory._timer is None
    assert (memory.running, memory.releases, given_back()) == (1, 0, 0)

    await second.aclose()
    await asyncio.wait_for(until_given_back(1), 10)
    assert (memory.running, memory.releases, given_back()) == (0, 1, 1)

    # Idle again after another synthesis: given back again, once.
    async for _ in loaded.chunks(SynthesisRequest(model="blocking", text="hi")):
        pass
    await asyncio.wait_for(until_given_back(2), 10)
    assert memory._timer is None and memory._releasing is None
    assert (memory.running, memory.releases, given_back()) == (0, 2, 2)
