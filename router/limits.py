"""Limits that keep one router standing under load and abuse: admission control per model with a
bounded queue, a cap on request bodies, and a time-out on every wait for a backend.

Admission lives in the shared speech path, so it holds in every mode (in-process, HTTP
workers, Modal): past a model's `deploy.max_concurrent_inputs` running requests, at most
`max_queue` wait, and anyone beyond that is told to come back later (429 with Retry-After)
instead of piling up without bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import BackendTimeout, Overloaded


class Gate:
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

    async def enter(self) -> Place:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return Place(self)
        if self.waiting >= self.queue:
            raise Overloaded(
                f"model '{self.name}' is busy ({self.active} requests running, {self.waiting} "
                "waiting); try again later",
                retry_after=self.retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The place was handed over just as the wait ended: pass it on.
                self._leave()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Overloaded(
                f"model '{self.name}' stayed busy for {self.timeout:g} s; try again later",
                retry_after=self.retry_after(),
                status=503,
            ) from None
        return Place(self)

    def _leave(self, held: float | None = None) -> None:
        if held is not None:
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes to the next in line, `active` unchanged
                return
        self.active -= 1


class Place:
    """A held place in a gate; `leave()` is idempotent, so every exit path may call it."""

    def __init__(self, gate: Gate):
        self._gate: Gate | None = gate
        self._since = time.monotonic()

    def leave(self) -> None:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate._leave(time.monotonic() - self._since)


class Admission:
    """One gate per model (a request's config name and backend)."""

    def __init__(self, queue: int, timeout: float):
        self.queue = queue
        self.timeout = timeout
        self.gates: dict[tuple[str, str], Gate] = {}

    def gate(self, name: str, backend: str, limit: int) -> Gate:
        key = (name, backend)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = Gate(name, limit, self.queue, self.timeout)
        return gate


_END = object()
#: Streams whose close waits for a backend call that cannot be interrupted.
_closing: set[asyncio.Future[Any]] = set()


async def timed(source: AsyncIterator[bytes], seconds: float, model: str) -> AsyncIterator[bytes]:
    """`source`'s items, failing with BackendTimeout when the next one takes over `seconds`.

    Each wait is shielded, so a time-out is raised at once even where the backend's call runs
    in a thread that cannot be interrupted. On a time-out or a client's disconnect the pending
    read is then cancelled: a worker's HTTP stream closes at once (the worker stops), an
    in-process call finishes its chunk first; either way the stream is closed right after,
    which asks the backend for nothing more.
    """
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(source, _END))
            try:
                item = await asyncio.wait_for(asyncio.shield(pending), seconds)
            except TimeoutError:
                raise BackendTimeout(
                    f"model '{model}' sent no audio for {seconds:g} s (deploy.timeout)"
                ) from None
            pending = None
            if item is _END:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            pending.add_done_callback(lambda done: _close_after(done, source))
        else:
            await source.aclose()  # type: ignore[attr-defined]


def _close_after(done: asyncio.Future[Any], source: AsyncIterator[bytes]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: the request that wanted it is gone
    closing = asyncio.ensure_future(source.aclose())  # type: ignore[attr-defined]
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


ErrorRender = Callable[[Request, int, str, str], Response]


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 in the path's API family shape, before
    any of it reaches a route: by Content-Length at once, or as soon as a chunked body passes
    the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, render: ErrorRender):
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        # Read the body here (the route reads all of it anyway) and replay it: a limit checked
        # inside `receive` could only fail halfway through the route's parsing.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # what follows is the disconnect a streaming response awaits

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.render(
            Request(scope),
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            "request_too_large",
        )
        # The client may still be sending: close rather than read the rest.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
