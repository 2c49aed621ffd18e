"""router.chunking: bounded chunks, in order, every word kept, a short first chunk."""

from __future__ import annotations

import random

import pytest

from router.chunking import chunk_text, split_sentences

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "its", "form"]


def prose(sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += ","
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "...", '."']))
    return " ".join(out)


@pytest.mark.parametrize("max_chars", [40, 120, 250])
@pytest.mark.parametrize("seed", range(5))
def test_bounded_in_order_and_complete(max_chars, seed):
    text = prose(30, seed)
    chunks = chunk_text(text, max_chars)
    assert all(0 < len(chunk) <= max_chars for chunk in chunks)
    assert all(chunk == chunk.strip() for chunk in chunks)
    # Every word, in order, nothing added.
    assert " ".join(chunks).split() == text.split()


def test_first_chunk_is_one_sentence_and_the_rest_are_packed():
    text = "First sentence here. Second one! Third one? Fourth one."
    assert chunk_text(text, 250) == ["First sentence here.", "Second one! Third one? Fourth one."]


def test_packing_stops_at_the_bound():
    sentences = [f"Sentence number {i} is about forty characters." for i in range(10)]
    chunks = chunk_text(" ".join(sentences), 100)
    assert chunks[0] == sentences[0]
    # Two sentences of 45 characters fit in 100 (with the space); three do not.
    assert all(chunk.count("Sentence") == 2 for chunk in chunks[1:-1])


def test_long_sentence_without_stops_is_cut():
    # Piper took 1.7 GB on 960 characters with no stop: such a sentence must be cut.
    text = " ".join(["word"] * 240)
    chunks = chunk_text(text, 250)
    assert len(chunks) >= 4
    assert all(len(chunk) <= 250 for chunk in chunks)
    assert " ".join(chunks).split() == text.split()


def test_long_sentence_is_cut_at_clauses_first():
    clause = "and then the story went on for a while"
    text = ", ".join([clause] * 12) + "."
    chunks = chunk_text(text, 100)
    assert all(len(chunk) <= 100 for chunk in chunks)
    # Cuts fall after commas, so no clause is split across chunks.
    assert all(chunk.endswith((",", ".")) for chunk in chunks)
    assert " ".join(chunks).split() == text.split()


def test_a_word_longer_than_the_bound_is_cut_anywhere():
    word = "a" * 95
    chunks = chunk_text(word, 40)
    assert [len(c) for c in chunks] == [40, 40, 15]
    assert "".join(chunks) == word


def test_first_chunk_of_a_long_first_sentence_is_bounded():
    text = " ".join(["word"] * 100) + ". Short one."
    chunks = chunk_text(text, 60)
    assert len(chunks[0]) <= 60 and all(len(c) <= 60 for c in chunks)
    assert " ".join(chunks).split() == text.split()


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Pi is 3.14 exactly. Yes.", ["Pi is 3.14 exactly.", "Yes."]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("Wait... what? Really!", ["Wait...", "what?", "Really!"]),
        ("One line\n\nanother paragraph", ["One line", "another paragraph"]),
        ("你好。今天好吗？很好！", ["你好。", "今天好吗？", "很好！"]),
        ("No stop at the end", ["No stop at the end"]),
    ],
)
def test_sentence_boundaries(text, sentences):
    assert split_sentences(text) == sentences


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_blank_text_gives_no_chunks(text):
    assert chunk_text(text) == []


def test_bound_must_be_positive():
    with pytest.raises(ValueError):
        chunk_text("Hello.", 0)
