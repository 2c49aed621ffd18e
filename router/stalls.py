"""The stall time-out: a backend that sends nothing for `deploy.timeout` seconds fails the
request (504) at once, even where its call runs in a thread that cannot be interrupted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from router.errors import BackendTimeout

_END = object()
#: Streams whose close waits for a backend call that cannot be interrupted.
_closing: set[asyncio.Future[Any]] = set()


async def with_stall_timeout(source: AsyncIterator[bytes], seconds: float, model: str) -> AsyncIterator[bytes]:
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
