"""When each character of a text is heard: ElevenLabs' `alignment`.

Every chunk of text has a real start and end in the audio (its PCM's length); a backend that
measures its words (Piper) adds where each word starts and ends. Between those anchors the
characters are spread evenly, so the times are continuous from the first character to the
last, cover every character of the text as it was sent (spaces and line breaks included), and
end at the audio's real length.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anyio import to_thread

from functions.protocol import WordTimes
from router.encoding import StreamEncoder

if TYPE_CHECKING:
    from router.synthesis import Synthesis


@dataclass
class CharTimes:
    """Characters and their start and end in seconds from the start of the audio."""

    characters: list[str] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def extend(self, other: CharTimes) -> None:
        self.characters += other.characters
        self.starts += other.starts
        self.ends += other.ends

    def __bool__(self) -> bool:
        return bool(self.characters)


class Timeline:
    """The text's characters timed chunk by chunk, as each chunk's audio completes. A chunk's
    text is the text it was cut from with its whitespace evened out; its characters are found
    in that text again, and the whitespace before it is timed with it."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._used = 0  # characters of the text timed so far
        self._seconds = 0.0  # audio so far

    @property
    def seconds(self) -> float:
        return self._seconds

    def chunk(self, text: str, chunk: str, samples: int, words: list[WordTimes]) -> CharTimes:
        """Time `chunk`, the next chunk cut from `text` (all of the text that has arrived so
        far), whose audio took `samples` and whose backend measured `words` (in `chunk`'s
        characters and samples)."""
        places = self._places(text, chunk)
        start, end = self._used, (places[-1] + 1 if places else self._used)
        begin, length = self._seconds, samples / self.sample_rate
        anchors = [(start, begin), (end, begin + length)]
        for measured in words:
            for first, after, first_sample, after_sample in measured.words:
                if 0 <= first < after <= len(places):
                    anchors.append((places[first], begin + min(first_sample / self.sample_rate, length)))
                    anchors.append((places[after - 1] + 1, begin + min(after_sample / self.sample_rate, length)))
        self._used, self._seconds = end, begin + length
        return _spread(text[start:end], start, anchors)

    def rest(self, text: str) -> CharTimes:
        """What is left of `text` once every chunk is timed (the spaces after the last word),
        at the audio's end."""
        left = text[self._used:]
        self._used = len(text)
        return CharTimes(list(left), [self._seconds] * len(left), [self._seconds] * len(left))

    def _places(self, text: str, chunk: str) -> list[int]:
        """Where each of `chunk`'s characters is in `text`, a space standing in for any run of
        whitespace (the chunker joins sentences with one) and found at its first character."""
        places: list[int] = []
        at = self._used
        for char in chunk:
            if char.isspace():
                # Whitespace the chunker added where the text had none (a word cut in two)
                # sits on the character before it.
                places.append(at if at < len(text) and text[at].isspace() else max(at - 1, 0))
                while at < len(text) and text[at].isspace():
                    at += 1
                continue
            while at < len(text) and text[at] != char:
                at += 1
            if at >= len(text):
                break  # not in the text: the chunk was not cut from it; time what was found
            places.append(at)
            at += 1
        while places and text[places[-1]].isspace():
            places.pop()
        return places


def _spread(text: str, offset: int, anchors: list[tuple[int, float]]) -> CharTimes:
    """Each character of `text` (which starts at `offset`) timed by straight lines between the
    anchors: (character index, seconds) pairs, put in order and made never to go back in time."""
    anchors.sort()
    points: list[int] = []
    times: list[float] = []
    for char, seconds in anchors:
        if times and seconds < times[-1]:
            seconds = times[-1]
        if points and char == points[-1]:
            # The chunk's start holds its first character from the chunk's first sample (a
            # pause before the first word included); later, the latest time wins.
            if len(points) > 1:
                times[-1] = max(times[-1], seconds)
            continue
        points.append(char)
        times.append(seconds)

    def at(char: int) -> float:
        i = bisect.bisect_right(points, char) - 1
        if i < 0:
            return times[0]
        if i >= len(points) - 1:
            return times[-1]
        (a, b), (ta, tb) = (points[i], points[i + 1]), (times[i], times[i + 1])
        return ta + (tb - ta) * (char - a) / (b - a)

    timed = CharTimes()
    start = at(offset)
    for i, char in enumerate(text):
        end = at(offset + i + 1)
        timed.characters.append(char)
        timed.starts.append(start)
        timed.ends.append(end)
        start = end
    return timed


@dataclass
class TimedSegment:
    """Encoded audio and the characters heard in it, timed in seconds from the start of the
    whole audio; None where they come with a later segment. A chunk's characters start where
    its audio starts."""

    audio: bytes
    alignment: CharTimes | None


async def timed_segments(
    synthesis: Synthesis, encoder: StreamEncoder, *, whole_chunks: bool
) -> AsyncIterator[TimedSegment]:
    """`synthesis`'s audio encoded by `encoder`, with its characters' times. With `whole_chunks`,
    each text chunk's audio is held until it is complete and sent with its characters
    (ElevenLabs' `sync_alignment`); otherwise audio leaves as the backend makes it, one piece
    behind, and a chunk's characters come with its last piece. What follows the last chunk (the
    spaces after its last word) ends it, with no audio. The encoder is the caller's to finish: a
    WebSocket context encodes every text it is given into one stream."""
    timeline = Timeline(synthesis.sample_rate)
    held: list[bytes] = []  # PCM of the current chunk not sent yet
    words: list[WordTimes] = []
    samples = 0
    async with aclosing(synthesis) as steps:
        async for step in steps:
            if step.words is not None:
                words.append(step.words)
            elif step.pcm:
                samples += len(step.pcm) // 2
                if held and not whole_chunks:
                    yield TimedSegment(await to_thread.run_sync(encoder.encode, b"".join(held)), None)
                    held = []
                held.append(step.pcm)
            elif step.ended:
                alignment = timeline.chunk(synthesis.text, step.text, samples, words)
                yield TimedSegment(await to_thread.run_sync(encoder.encode, b"".join(held)), alignment)
                held, words, samples = [], [], 0
    if not timeline.seconds:
        raise synthesis.no_audio()
    rest = timeline.rest(synthesis.text)
    if rest:
        yield TimedSegment(b"", rest)
