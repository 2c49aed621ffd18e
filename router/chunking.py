"""Split text into sentence-sized chunks for synthesis.

Small chunks bound the backend's memory (Piper took 1.7 GB on 960 characters with no sentence
stop), let the first audio leave after the first chunk, and let long texts fan out. The first
chunk is one sentence alone so the time to first audio stays short; later sentences are packed
together up to `max_chars`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# A sentence ends after terminal punctuation and any closing quotes or brackets: ASCII marks only
# where whitespace follows (so "3.14" stays whole), CJK marks anywhere (CJK puts no space after
# them); a blank line ends one too.
_SENTENCE_END = re.compile(
    r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[\"'”’)\]」』]*|\n\s*\n"
)
_CLAUSE_END = re.compile(r"(?<=[,;:，；：—])\s+")


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        sentences.append(text[start : match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    """Cut a sentence longer than `max_chars` at clause marks, then at spaces, then anywhere."""
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
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
    sentences: list[str] = []
    for sentence in split_sentences(text):
        if len(sentence) > max_chars:
            sentences.extend(_split_long(sentence, max_chars))
        else:
            sentences.append(sentence)
    if not sentences:
        return []
    return [sentences[0], *_pack(sentences[1:], max_chars)]
