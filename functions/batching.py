"""Batching: while a model generates, the chunks of text that arrive for it queue, and go together
into its next generation (up to `deploy.max_batch_size`); a chunk that finds the model free waits
up to `deploy.batch_wait_ms` for others. A backend that can generate several chunks in one call
offers `Batchable`; the host (functions/serving.py) composes a `Batcher` over it, so every mode
batches with no change to the router.

Each chunk gets its own audio. A chunk whose request is cancelled (or timed out) before its
generation leaves the queue; during it, its audio is dropped. A generation that fails with several
chunks is tried again one chunk at a time, so that only the chunk at fault fails. A seeded chunk is
generated alone: torch's one global generator cannot seed each item of a batch, and alone its audio
is what it would have been unbatched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from anyio import to_thread

from functions.protocol import SynthesisRequest


@dataclass(frozen=True)
class Prepared:
    """One chunk of text checked and made ready for a generation (`Batchable.prepare`)."""

    #: What the backend's generation takes for this chunk (its own affair).
    inputs: Any
    #: Chunks with equal keys may share a generation: their generation options are the same.
    key: Hashable = ()
    #: A seeded chunk is generated alone, with its seed.
    seed: int | None = None


@runtime_checkable
class Batchable(Protocol):
    def prepare(self, request: SynthesisRequest) -> Prepared:
        """Check the request (raising what `synthesize` would) and ready its inputs."""

    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        """One generation for all of `batch` (equal keys; one seeded chunk at most, alone): each
        chunk's PCM, in order, at its own length."""


#: Told each batch's size and the seconds each of its chunks waited for it to start.
BatchObserver = Callable[[int, list[float]], None]


@dataclass(eq=False)
class _Waiting:
    prepared: Prepared
    audio: asyncio.Future[bytes]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, backend: Batchable, max_size: int, wait_seconds: float, observe: BatchObserver):
        self.backend = backend
        self.max_size, self.wait_seconds, self._observe = max_size, wait_seconds, observe
        self._queue: list[_Waiting] = []
        self._changed = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    async def generate(self, prepared: Prepared) -> bytes:
        waiting = _Waiting(prepared, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._changed.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        try:
            return await waiting.audio
        finally:
            if waiting in self._queue:  # cancelled before its generation: the others go on without it
                self._queue.remove(waiting)
                self._changed.set()

    async def _drive(self) -> None:
        while self._queue:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Waiting]:
        first = self._queue[0]
        # A seeded chunk goes alone: it has no company to wait for.
        while first.prepared.seed is None and len(self._joining(first)) < self.max_size:
            left = first.arrived + self.wait_seconds - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
            if first not in self._queue:
                return []  # it was cancelled: the next in line opens the batch
        batch = self._joining(first)
        for waiting in batch:
            self._queue.remove(waiting)
        return batch

    def _joining(self, first: _Waiting) -> list[_Waiting]:
        if first.prepared.seed is not None or self.max_size == 1:
            return [first]
        return [waiting for waiting in self._queue
                if waiting.prepared.key == first.prepared.key and waiting.prepared.seed is None][:self.max_size]

    async def _run(self, batch: list[_Waiting]) -> None:
        started = time.monotonic()
        self._observe(len(batch), [started - waiting.arrived for waiting in batch])
        try:
            audio = await to_thread.run_sync(self.backend.generate_batch, [waiting.prepared for waiting in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # One chunk's input may fail a whole batch: alone, only that one fails.
            for waiting in batch:
                if not waiting.audio.done():
                    await self._run([waiting])
            return
        for waiting, pcm in zip(batch, audio, strict=True):
            _settle(waiting, pcm)


def _settle(waiting: _Waiting, outcome: bytes | Exception) -> None:
    if waiting.audio.done():
        return  # its request was cancelled meanwhile
    if isinstance(outcome, Exception):
        waiting.audio.set_exception(outcome)
    else:
        waiting.audio.set_result(outcome)
