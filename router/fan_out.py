"""Fan-out: the chunks of one text synthesised up to `deploy.fan_out` at once, and still heard
in order. While one chunk streams, later chunks whose text has already arrived start in tasks of
their own; each one's PCM waits in a queue (one chunk of text: a few hundred kB at most) until
the listener gets to it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from functions.protocol import Spoken
from router.chunking import TextChunks
from router.runners import PcmStream


class FanOut:
    """The PCM streams of the text's `chunks` in order, each with its text, the first already
    open, `width` of them synthesised at once. `close()` cancels the chunks started ahead."""

    def __init__(self, chunks: TextChunks, first_text: str, first: PcmStream, width: int,
                 open_chunk: Callable[[str], Awaitable[PcmStream]]):
        self._chunks, self._width, self._open = chunks, width, open_chunk
        self._first = (first_text, first)
        self._ahead: deque[tuple[str, _Prefetch]] = deque()

    async def streams(self) -> AsyncIterator[tuple[str, PcmStream]]:
        current: tuple[str, PcmStream] | None = self._first
        while current is not None:
            while len(self._ahead) < self._width - 1 and (text := self._chunks.ready_now()) is not None:
                self._ahead.append((text, _Prefetch(self._open(text))))
            yield current
            if self._ahead:
                text, prefetch = self._ahead.popleft()
                current = (text, await prefetch.stream())
            elif (text := await self._chunks.next()) is not None:
                current = (text, await self._open(text))
            else:
                current = None

    def close(self) -> None:
        for _, prefetch in self._ahead:
            prefetch.cancel()
        self._ahead.clear()


class _Prefetch:
    """One later chunk, synthesised in its own task while earlier ones stream."""

    def __init__(self, opening: Awaitable[PcmStream]):
        #: first the sample rate, then PCM pieces (and word times), then None; or an exception
        self._queue: asyncio.Queue[int | Spoken | BaseException | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(opening))

    async def _run(self, opening: Awaitable[PcmStream]) -> None:
        try:
            stream = await opening
            self._queue.put_nowait(stream.sample_rate)
            async with aclosing(stream.audio) as audio:
                async for pcm in audio:
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

    async def _drain(self) -> AsyncIterator[Spoken]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            assert not isinstance(item, int)
            yield item

    def cancel(self) -> None:
        self._task.cancel()
