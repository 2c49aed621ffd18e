"""Split text into sentence-sized chunks for synthesis.

Small chunks bound the backend's memory (Piper took 1.7 GB on 960 characters with no sentence
stop), let the first audio leave after the first chunk, and let long texts fan out. The first
chunk is one sentence alone so the time to first audio stays short; later sentences are packed
together up to `max_chars`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator

from router import text as rules


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    """Cut a sentence longer than `max_chars` at clause marks, then at spaces, then anywhere."""
    pieces: list[str] = []
    for clause in rules.CLAUSE_END.split(sentence):
        while len(clause) > max_chars:
            cut = clause.rfind(" ", 0, max_chars + 1)
            if cut <= 0:
                cut = max_chars
            pieces.append(clause[:cut])
            clause = clause[cut:].lstrip()
        if clause:
            pieces.append(clause)
    yield from _pack(pieces, max_chars)


def _pack(pieces: list[str], max_chars: int) -> Iterator[str]:
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            yield current
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        yield current


def chunk_text(text: str, max_chars: int = 250) -> list[str]:
    """Chunks of at most `max_chars` characters, in order, covering every word of `text`."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    cutter = ChunkCutter(max_chars)
    cutter.add(text)
    cutter.complete()
    return list(iter(cutter.take, None))


class ChunkCutter:
    """Text added piece by piece, cut into chunks as its sentences complete: the first chunk is
    the first sentence alone (the first audio leaves early), each later one every complete
    sentence there is, packed up to `max_chars`. `complete()` ends the sentence being written
    (a flush, or the end of the text). With `split` false (a prompt, not prose) the whole text
    is one chunk."""

    def __init__(self, max_chars: int, split: bool = True):
        self._max_chars = max_chars
        self._split = split
        self._ready: deque[str] = deque()  # complete sentences (long ones already cut)
        self._tail = ""  # text whose sentence has not ended yet
        self._given = 0

    def add(self, piece: str) -> None:
        self._tail += piece
        if not self._split:
            return
        ends = [match.end() for match in rules.SENTENCE_END.finditer(self._tail)]
        self._move(ends[-1] if ends else 0)
        if len(self._tail.strip()) > self._max_chars:
            # A sentence longer than a chunk: what fits leaves now; its last part waits for more.
            # (Split without its spaces at either end; the trailing ones still part the next word.)
            trailing = self._tail[len(self._tail.rstrip()):]
            *whole, last = _split_long(self._tail.strip(), self._max_chars)
            self._ready.extend(whole)
            self._tail = last + trailing

    def complete(self) -> None:
        self._move(len(self._tail))

    def ready(self) -> int:
        """How many chunks `take` would hand out from the text added so far."""
        counting = ChunkCutter(self._max_chars, self._split)
        counting._ready, counting._given = deque(self._ready), self._given
        return len(list(iter(counting.take, None)))

    def take(self) -> str | None:
        """The next chunk if one can be cut from the text added so far, else None."""
        if not self._ready:
            return None
        self._given += 1
        chunk = self._ready.popleft()
        while self._given > 1 and self._ready and len(chunk) + 1 + len(self._ready[0]) <= self._max_chars:
            chunk = f"{chunk} {self._ready.popleft()}"
        return chunk

    def _move(self, end: int) -> None:
        """Move the sentences of the tail's first `end` characters into the ready queue."""
        done, self._tail = self._tail[:end], self._tail[end:]
        if not self._split:
            if done.strip():
                self._ready.append(done)
            return
        for sentence in split_sentences(done):
            if len(sentence) > self._max_chars:
                self._ready.extend(_split_long(sentence, self._max_chars))
            else:
                self._ready.append(sentence)


#: Among a text's fragments: cut now what is buffered, even mid-sentence (ElevenLabs' `flush`).
FLUSH = object()
#: Text as it arrives: strings, and FLUSH marks.
Fragments = AsyncIterator[object]


class TextChunks:
    """The chunks a job's text is cut into (`ChunkCutter`'s), each handed out as soon as its
    sentences are complete. A text given whole is cut at once (and its chunks counted); text
    that arrives in fragments (a WebSocket's messages) is read as it comes, by a task of its own,
    each fragment cleaned and the text so far checked as the text rules say (what they refuse
    comes out of `next`); a FLUSH, or the end, completes what is buffered. `aclose` stops reading."""

    def __init__(self, text: str | Fragments, max_chars: int, split: bool, limit: int, param: str):
        self._cutter = ChunkCutter(max_chars, split)
        self._limit, self._param = limit, param
        self._error: BaseException | None = None
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        if isinstance(text, str):
            #: Every fragment so far, cleaned: the whole text once it has all arrived.
            self.text = text
            self._fragments: Fragments | None = None
            self._cutter.add(text)
            self._cutter.complete()
            self._ended = True
            #: How many chunks the text makes, where it is known (given whole).
            self.total: int | None = self._cutter.ready()
        else:
            self.text, self._fragments, self._ended, self.total = "", text, False, None

    async def next(self) -> str | None:
        """The next chunk, waiting for text as long as none is complete; None at the end."""
        if self._fragments is not None and self._reader is None:
            self._reader = asyncio.ensure_future(self._read(self._fragments))
        while (chunk := self._cutter.take()) is None and not self._ended:
            self._arrived.clear()
            await self._arrived.wait()
        if self._error is not None:
            raise self._error
        return chunk

    def ready_now(self) -> str | None:
        """The next chunk if one can be cut from the text already here, else None."""
        return self._cutter.take()

    async def aclose(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            # Until the reader has let go, the fragments' generator is still running and cannot close.
            await asyncio.wait([self._reader])
        closing = getattr(self._fragments, "aclose", None)
        if closing is not None:
            await closing()

    async def _read(self, fragments: Fragments) -> None:
        try:
            async for fragment in fragments:
                if fragment is FLUSH:
                    self._cutter.complete()
                else:
                    fragment = rules.clean(str(fragment))
                    self.text += fragment
                    rules.check(self.text, self._limit, self._param)
                    self._cutter.add(fragment)
                self._arrived.set()
            self._cutter.complete()
        except Exception as exc:
            self._error = exc
        finally:
            self._ended = True
            self._arrived.set()


def split_sentences(text: str) -> list[str]:
    """`text` cut after each sentence's end (the text rules' SENTENCE_END)."""
    sentences: list[str] = []
    start = 0
    for match in rules.SENTENCE_END.finditer(text):
        sentences.append(text[start : match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]

