"""Async streams of audio, and the three ways Chorus makes them.

Every stream is closed by whoever holds it, read or not: closing one stops the synthesis behind
it. An async generator that never ran skips its `finally`, so what a stream must release is
given to `released_by` and runs on close whatever happened before. `primed` puts an item already
made in front of a stream. `one_by_one` fetches each item as a task of its own, so that a
consumer who leaves (or times out) mid-fetch is let go at once while the source is closed only
once that fetch is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("chorus")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: What `fetch` returns after the last item.
END: Any = object()
#: Closes of sources left mid-fetch, kept referenced until they have run.
_closing: set[asyncio.Future[None]] = set()


class Stream(Protocol[T_co]):
    """An async iterator that can be closed, read or not (an async generator is one)."""

    def __aiter__(self) -> AsyncIterator[T_co]: ...

    async def __anext__(self) -> T_co: ...

    async def aclose(self) -> None: ...


def released_by(items: AsyncIterator[T], release: Callable[[], Awaitable[None]]) -> Stream[T]:
    """`items`, with `release` run when the stream ends, fails or is closed, even unread."""
    return _Released(items, release)


def primed(first: T, rest: Stream[T]) -> Stream[T]:
    """`first` (already made), then `rest`."""

    async def items() -> AsyncIterator[T]:
        yield first
        async for item in rest:
            yield item

    return _Released(items(), rest.aclose)


async def one_by_one(
    fetch: Callable[[], Awaitable[Any]],
    close: Callable[[], Awaitable[None]],
    *,
    interrupt: bool,
    timeout: float | None = None,
    timed_out: Callable[[], Exception] | None = None,
) -> AsyncIterator[Any]:
    """The items `fetch()` returns until it returns END, each fetched in a shielded task; then
    `close()`. Past `timeout` seconds for one item, `timed_out()` is raised at once.

    A consumer that leaves mid-fetch is not kept waiting: the fetch is cancelled where it can be
    (`interrupt`: an HTTP read) and left to finish where it cannot (a call in a thread, which
    asyncio does not wait for), and `close()` runs once it is over. Closing a generator under its
    own running thread crashed the interpreter.
    """
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(fetch())
            # asyncio.wait, not wait_for: Python 3.11's wait_for returns an item that arrives as
            # its caller is cancelled, and the cancel is lost.
            if not (await asyncio.wait({pending}, timeout=timeout))[0]:
                assert timed_out is not None
                raise timed_out()
            item = pending.result()
            pending = None
            if item is END:
                return
            yield item
    finally:
        if pending is None or pending.done():
            await close()
        else:
            if interrupt:
                pending.cancel()
            pending.add_done_callback(lambda done: _close_after(done, close))


def _close_after(done: asyncio.Future[Any], close: Callable[[], Awaitable[None]]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: whoever wanted the item is gone
    closing = asyncio.ensure_future(close())
    _closing.add(closing)
    closing.add_done_callback(_closed)


def _closed(closing: asyncio.Future[Any]) -> None:
    _closing.discard(closing)
    if not closing.cancelled() and closing.exception() is not None:
        log.warning("closing a stream failed: %s", closing.exception())


class _Released(Generic[T]):
    def __init__(self, items: AsyncIterator[T], release: Callable[[], Awaitable[None]]):
        self._items = items
        self._release: Callable[[], Awaitable[None]] | None = release

    def __aiter__(self) -> _Released[T]:
        return self

    async def __anext__(self) -> T:
        if self._release is None:
            raise StopAsyncIteration
        try:
            return await anext(self._items)
        except BaseException:
            # The end, a failure or a cancelled read: nothing more will be read.
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._release is None:
            return
        release, self._release = self._release, None
        try:
            aclose = getattr(self._items, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await release()
