"""Text rules, in one place: what is cleaned out of a text, what makes one unacceptable, and where
a text may be cut (sentence and clause ends). The chunker and every front door use these."""

from __future__ import annotations

import re

from router.errors import InvalidRequest

# Control characters carry no speech and break phonemisers (a NUL ends espeak's input).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Half of a UTF-16 surrogate pair with no other half: JSON can carry one (`"\ud800"`), but it is no
# character, and no backend can encode it.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: A sentence ends after terminal punctuation and any closing quotes or brackets: ASCII marks only
#: where whitespace follows (so "3.14" stays whole), CJK marks anywhere (CJK puts no space after
#: them); a blank line ends one too.
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[\"'”’)\]」』]*|\n\s*\n")
#: Where a long sentence may be cut: after a clause's mark (the whitespace that follows it).
CLAUSE_END = re.compile(r"(?<=[,;:，；：—])\s+")
#: Where text that is still being written may be cut for speech: after a sentence's or a
#: clause's mark, its closing quotes and the space after them.
SPOKEN_PAUSE = re.compile(r"[.!?…。！？,;:，；：—][\"'”’)\]]*\s")


def clean(text: str) -> str:
    return _CONTROL.sub(" ", text)


def check(text: str, limit: int, param: str) -> None:
    """Raises InvalidRequest, naming `param`, for a text longer than `limit` or one that is not
    valid Unicode."""
    if len(text) > limit:
        raise InvalidRequest(f"'{param}' is {len(text)} characters long; the limit is {limit}", param=param)
    if (broken := _LONE_SURROGATE.search(text)) is not None:
        raise InvalidRequest(
            f"'{param}' is not valid Unicode: character {broken.start()} is half of a UTF-16 surrogate "
            f"pair (U+{ord(broken[0]):04X}) with no other half", param=param,
        )


def speakable(text: str) -> bool:
    """Whether `text` holds a letter or a digit: punctuation alone says nothing. (Symbols can't be
    refused up front: espeak names many, an emoji or a snowman.)"""
    return any(char.isalnum() for char in text)
