"""Words of a request's text timed from a model's phoneme spans, for the backends that measure
them (Piper's phoneme alignments, Kokoro's token durations). Both phonemise with espeak-ng,
which puts a space between words and keeps a word's trailing punctuation."""

from __future__ import annotations

import re
from collections.abc import Iterable

from functions.protocol import WordTimes

#: A word's trailing punctuation, after any closing quotes or brackets; espeak keeps it too.
_TRAILING_MARK = re.compile(r"([,.;:!?])[\"'”’)\]]*$")
_MARKS = ",.;:!?"


class WordTiming:
    """A model's phonemes, sentence by sentence, as times of the words of `text`. Each of
    espeak's words (phonemes between spaces) is matched to the next word of the text; where the
    two stop agreeing (a number read as several words, a dash read as none) the words after it
    get no times of their own, and the router spreads them over the rest of the audio."""

    def __init__(self, text: str, pauses: Iterable[str] = (" ",)):
        self._words = [(match.start(), match.end()) for match in re.finditer(r"\S+", text)]
        self._text = text
        self._pauses = frozenset(pauses)
        self._next = 0
        self._agrees = True

    def sentence(self, phonemes: Iterable[tuple[str, int, int]] | None, offset: int) -> WordTimes | None:
        """`phonemes` are (phoneme, its first sample, the sample after it) in a piece of audio
        that starts `offset` samples into the request's; None where the model gave none."""
        if not self._agrees or phonemes is None:
            self._agrees = False
            return None
        spoken = self._spoken_words(phonemes)
        words = self._words[self._next:self._next + len(spoken)]
        marks = [_TRAILING_MARK.search(self._text[start:end]) for start, end in words]
        if len(words) != len(spoken) or any(
            (mark.group(1) if mark else "") != said_mark for mark, (_, _, said_mark) in zip(marks, spoken, strict=True)
        ):
            self._agrees = False
            return None
        self._next += len(spoken)
        return WordTimes(tuple(
            (start, end, offset + first, offset + last)
            for (start, end), (first, last, _) in zip(words, spoken, strict=True)
        ))

    def _spoken_words(self, phonemes: Iterable[tuple[str, int, int]]) -> list[tuple[int, int, str]]:
        """Each word spoken: its first sample, the sample after it, and its trailing mark."""
        words: list[tuple[int, int, str]] = []
        current: list[str] = []
        start = end = 0
        for phoneme, first, last in phonemes:
            if phoneme in self._pauses:
                if current:
                    words.append((start, end, current[-1] if current[-1] in _MARKS else ""))
                    current = []
                continue
            if not current:
                start = first
            current.append(phoneme)
            end = last
        if current:
            words.append((start, end, current[-1] if current[-1] in _MARKS else ""))
        return words


def spans(durations: Iterable[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(phoneme, samples it took), one after another, as (phoneme, first sample, sample after)."""
    position = 0
    result = []
    for phoneme, samples in durations:
        result.append((phoneme, position, position + int(samples)))
        position += int(samples)
    return result
