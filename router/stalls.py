"""The stall time-out: a backend that sends nothing for `deploy.timeout` seconds fails the
request (504) at once, even where its call runs in a thread that cannot be interrupted."""

from __future__ import annotations

from typing import TypeVar

from functions.streams import END, Stream, one_by_one
from router.errors import BackendTimeout

T = TypeVar("T")


def with_stall_timeout(source: Stream[T], seconds: float, model: str) -> Stream[T]:
    """`source`'s items, failing with BackendTimeout when the next one takes over `seconds`.

    On a time-out or a client's disconnect the pending read is cancelled: a worker's HTTP stream
    closes at once (the worker stops), an in-process call finishes its chunk first; either way
    the stream is closed right after, which asks the backend for nothing more.
    """

    def timed_out() -> BackendTimeout:
        return BackendTimeout(f"model '{model}' sent no audio for {seconds:g} s (deploy.timeout)")

    return one_by_one(lambda: anext(source, END), source.aclose, interrupt=True, timeout=seconds,
                      timed_out=timed_out)
