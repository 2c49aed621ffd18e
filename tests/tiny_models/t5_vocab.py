"""A T5 (Unigram) vocabulary made in code: letters, digits and punctuation, with and without
the word-start mark, so any English text tokenizes without a sentencepiece file."""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "</s>", "<unk>"]


def t5_vocab() -> list[tuple[str, float]]:
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces = ["▁"] + [f"▁{c}" for c in chars] + list(chars)
    return [(token, 0.0) for token in SPECIALS] + [(piece, -1.0) for piece in pieces]
