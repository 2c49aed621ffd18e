"""When a socket context's text is spoken: ElevenLabs' `chunk_length_schedule`, `auto_mode` and
`flush`, as one context's text schedule. What it releases goes to synthesis as jobs, one per
flushed stretch of text, each the fragments of one speech job (router/chunking.py cuts them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from router import text as rules
from router.chunking import FLUSH, Fragments

#: Ends the job the context is speaking (after a flush).
_JOB_END = object()
#: Ends the context: no job follows.
_END = None


class TextSchedule:
    """One context's text: what is buffered, and what is released for synthesis. Text is
    released when the buffer reaches the next step of `schedule` at a sentence's or a clause's
    end (with `auto_mode`, at once: the chunker cuts at each sentence's end), on a flush, and at
    the end; no job is longer than `limit` (the input limit), a long stream being several."""

    def __init__(self, schedule: list[int], limit: int):
        self._schedule, self._limit = schedule, limit
        #: Text received and not yet released.
        self.buffer = ""
        #: Released fragments (str), cut marks (FLUSH), job ends (_JOB_END), the end (_END).
        self._released: asyncio.Queue[object] = asyncio.Queue()
        self._generations = 0
        self._job_chars = 0
        #: The client ended its text with an empty flush: closing lets the speech finish.
        self.flushed = False
        #: No more text will come.
        self.closing = False

    def add(self, text: str, auto_mode: bool) -> None:
        self.flushed = False
        self.buffer += text
        if auto_mode:
            self._release(len(self.buffer))
            return
        while True:
            threshold = self._schedule[min(self._generations, len(self._schedule) - 1)]
            if len(self.buffer) < min(threshold, self._limit):
                break
            cut = max((m.end() for m in rules.SPOKEN_PAUSE.finditer(self.buffer) if threshold <= m.end() <= self._limit),
                      default=0)
            if not cut and len(self.buffer) >= self._limit:
                # No pause at all in a long stretch: a space will do, else all of it.
                cut = self.buffer.rfind(" ", 0, self._limit) + 1 or self._limit
            if not cut:
                break
            self._release(cut, mark=True)
            self._generations += 1

    def flush(self, ends: bool) -> None:
        """Release what is buffered, as the end of a job; `ends`: the client's whole text."""
        self._release(len(self.buffer), mark=True)
        self._end_job()
        self.flushed = ends

    def end(self) -> None:
        """No more text: what is buffered is the last job."""
        self._release(len(self.buffer), mark=True)
        self.closing = True
        self._released.put_nowait(_END)

    def _release(self, end: int, mark: bool = False) -> None:
        text, self.buffer = self.buffer[:end], self.buffer[end:]
        if not self._job_chars and not text.strip():
            return  # spaces before a job's first word (the opening " ") say nothing
        if self._job_chars + len(text) > self._limit:
            self._released.put_nowait(FLUSH)
            self._end_job()
        if text:
            self._released.put_nowait(text)
            self._job_chars += len(text)
        if mark and self._job_chars:
            self._released.put_nowait(FLUSH)

    def _end_job(self) -> None:
        if self._job_chars:
            self._released.put_nowait(_JOB_END)
        self._job_chars = 0

    async def next_job(self) -> Fragments | None:
        """The fragments of the next job, as they are released; None once the context has ended."""
        while (first := await self._released.get()) in (FLUSH, _JOB_END):
            pass  # a flush with nothing before it
        if first is _END:
            self._released.put_nowait(_END)
            return None

        async def fragments() -> AsyncIterator[object]:
            item = first
            while item is not _JOB_END:
                if item is _END:
                    self._released.put_nowait(_END)  # the context ends after this job
                    return
                yield item
                item = await self._released.get()

        return fragments()
