"""Fan-out: the chunks of one text synthesised up to `deploy.fan_out` at once, and still heard
in order. While one chunk streams, later chunks whose text has already arrived start in tasks of
their own; each one's PCM waits in a queue (one chunk of text: a few hundred kB at most) until
the listener gets to it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from router.chunking import StreamedChunks
from router.runners import PcmStream


class FanOut:
    """The PCM streams of `source`'s chunks in order, the first already open, `width` of them
    synthesised at once. `close()` cancels the chunks started ahead."""

    def __init__(self, source: StreamedChunks, first: PcmStream, width: int,
                 open_chunk: Callable[[str], Awaitable[PcmStream]]):
        self._source, self._first, self._width, self._open = source, first, width, open_chunk
        self._ahead: deque[_Prefetch] = deque()

    async def streams(self) -> AsyncIterator[PcmStream]:
        stream: PcmStream | None = self._first
        while stream is not None:
            while len(self._ahead) < self._width - 1 and (text := self._source.ready_now()) is not None:
                self._ahead.append(_Prefetch(self._open(text)))
            yield stream
            if self._ahead:
                stream = await self._ahead.popleft().stream()
            elif (text := await self._source.next()) is not None:
                stream = await self._open(text)
            else:
                stream = None

    def close(self) -> None:
        for prefetch in self._ahead:
            prefetch.cancel()
        self._ahead.clear()


class _Prefetch:
    """One later chunk, synthesised in its own task while earlier ones stream."""

    def __init__(self, opening: Awaitable[PcmStream]):
        #: first the sample rate, then PCM pieces, then None; or an exception at any point
        self._queue: asyncio.Queue[int | bytes | BaseException | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(opening))

    async def _run(self, opening: Awaitable[PcmStream]) -> None:
        try:
            stream = await opening
            self._queue.put_nowait(stream.sample_rate)
            async with aclosing(stream.chunks) as chunks:
                async for pcm in chunks:
                    self._queue.put_nowait(pcm)
            self._queue.put_nowait(None)
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def stream(self) -> PcmStream:
        rate = await self._queue.get()
        if isinstance(rate, BaseException):
            raise rate
        assert isinstance(rate, int)
        return PcmStream(rate, self._drain())

    async def _drain(self) -> AsyncIterator[bytes]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item

    def cancel(self) -> None:
        self._task.cancel()
