"""Admission control per model: past a model's capacity (`deploy.max_concurrent_inputs`, times
its containers where it scales out) running requests, at most `max_queue` wait, first come first
served, and anyone beyond that is told to come back later (429 with Retry-After) instead of
piling up without bound. It lives in the shared speech path, so it holds in every mode.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from router.errors import Overloaded


class ModelQueue:
    """At most `limit` holders at once, at most `queue` waiting, first come first served."""

    def __init__(self, name: str, limit: int, queue: int, timeout: float):
        self.name = name
        self.limit = limit
        self.queue = queue
        self.timeout = timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Moving average of how long a holder keeps its place: the basis of Retry-After.
        self._hold_seconds = 1.0

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def retry_after(self) -> int:
        # Time for the queue ahead to drain, at `limit` holders at a time.
        backlog = (self.waiting + 1) / self.limit
        return max(1, min(60, math.ceil(backlog * self._hold_seconds)))

    async def enter(self) -> Slot:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return Slot(self)
        if self.waiting >= self.queue:
            raise Overloaded(
                f"model '{self.name}' is busy ({self.active} requests running, {self.waiting} "
                "waiting); try again later",
                retry_after=self.retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # asyncio.wait, not wait_for: Python 3.11's wait_for keeps a place handed over just
            # as its caller is cancelled, and the caller goes on as if it had not been.
            handed = bool((await asyncio.wait({waiter}, timeout=self.timeout))[0])
        except asyncio.CancelledError:
            self._give_up(waiter)
            raise
        if not handed:
            self._give_up(waiter)
            raise Overloaded(
                f"model '{self.name}' stayed busy for {self.timeout:g} s; try again later",
                retry_after=self.retry_after(),
                status=503,
            )
        return Slot(self)

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            self._leave()  # the place was handed over just as the wait ended: pass it on
        else:
            waiter.cancel()
            self._waiters.remove(waiter)

    def _leave(self, held: float | None = None) -> None:
        if held is not None:
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes to the next in line, `active` unchanged
                return
        self.active -= 1


class Slot:
    """A held place in a model's queue; `leave()` is idempotent, so every exit path may call it."""

    def __init__(self, gate: ModelQueue):
        self._gate: ModelQueue | None = gate
        self._since = time.monotonic()

    def leave(self) -> None:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate._leave(time.monotonic() - self._since)


class Admission:
    """One queue per model (a request's config name and backend)."""

    def __init__(self, queue: int, timeout: float):
        self.queue = queue
        self.timeout = timeout
        self.gates: dict[tuple[str, str], ModelQueue] = {}

    def gate(self, name: str, backend: str, limit: int) -> ModelQueue:
        key = (name, backend)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = ModelQueue(name, limit, self.queue, self.timeout)
        return gate

    def forget(self, name: str, backend: str) -> bool:
        """Drop a model's queue if nobody holds or waits for a place in it; whether it is gone."""
        gate = self.gates.get((name, backend))
        if gate is not None and (gate.active or gate.waiting):
            return False
        self.gates.pop((name, backend), None)
        return True
