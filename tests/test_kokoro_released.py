"""Kokoro-82M as released (tests/released_kokoro.py: the int8 ONNX export and its five Japanese
voices, joined and checked by their SHA-256), through Chorus's production path: a config, the
weights as the models directory, the worker in the Kokoro image, `chorus serve` in http mode in
front of it. English is heard by the tests' ASR (tests/hearing.py); Japanese, which that ASR cannot
hear, is checked by its length and its voices. test_heard.py hears every route and format."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import onnxruntime
import pytest

from tests.audio import Decoded, assert_speech, decode
from tests.hearing import HARVARD, word_error_rate
from tests.released_kokoro import CONFIG, JAPANESE, MODEL_FILE, RATE
from tests.tiny_models.harness import pcm, synthesize

pytestmark = pytest.mark.images

#: The first two sentences of HARVARD: two chunks for the router.
TWO_SENTENCES = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."
#: How well the ASR must hear Kokoro's English (it heard 3 words in 25 wrong when this was written).
HEARD = 0.25


def speak(worker: str, text: str = HARVARD, **request: object) -> Decoded:
    return decode(pcm(synthesize(worker, CONFIG, text=text, **request), RATE), raw="pcm", rate=RATE)


def test_the_release_has_no_duration_output(released_kokoro_models) -> None:
    """Why its words are timed by chunk spans: the model says how long each token lasts nowhere."""
    session = onnxruntime.InferenceSession(str(released_kokoro_models / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens", "style", "speed"]
    assert [o.name for o in session.get_outputs()] == ["audio"]


def test_japanese_in_japanese_voices(released_kokoro_worker: str, released_kokoro_chorus) -> None:
    alpha, kumo = (speak(released_kokoro_worker, JAPANESE, voice=voice) for voice in ("jf_alpha", "jm_kumo"))
    # 19 morae and a pause: about 2 s, in two different voices.
    for audio in (alpha, kumo):
        assert_speech(audio, (1.0, 4.0))
    assert not np.array_equal(alpha.samples, kumo.samples)
    # The config's default voice is jf_alpha, and Chorus serves the same audio as its worker.
    served = httpx.post(f"{released_kokoro_chorus.url}/tts", json={"model": CONFIG["name"], "input": JAPANESE},
                        timeout=300)
    assert served.status_code == 200, served.text
    assert decode(served.content).duration == pytest.approx(alpha.duration, abs=0.01)


def test_english_in_the_same_voice_with_language_set(released_kokoro_worker: str, listener) -> None:
    english = speak(released_kokoro_worker, language="en")
    own = speak(released_kokoro_worker)
    heard = listener.hear({"english": english, "own": own})
    assert word_error_rate(HARVARD, heard["english"]) <= HEARD, heard["english"]
    # Without `language`, the voice reads the text as Japanese: letter by letter, not as words.
    assert word_error_rate(HARVARD, heard["own"]) > 0.5, heard["own"]
    assert own.duration > 1.5 * english.duration


def test_a_weighted_mix_of_two_real_voices(released_kokoro_worker: str, listener) -> None:
    alpha, kumo, mix = (speak(released_kokoro_worker, voice=voice, language="en")
                        for voice in ("jf_alpha", "jm_kumo", "jf_alpha(2)+jm_kumo(1)"))
    assert not np.array_equal(mix.samples, alpha.samples) and not np.array_equal(mix.samples, kumo.samples)
    # Weights count as proportions only.
    assert np.array_equal(mix.samples, speak(released_kokoro_worker, voice="jf_alpha(4)+jm_kumo(2)",
                                             language="en").samples)
    heard = listener.hear({"mix": mix})["mix"]
    assert word_error_rate(HARVARD, heard) <= HEARD, heard


def test_speed_changes_how_long_the_words_take(released_kokoro_worker: str) -> None:
    normal, fast, slow = (speak(released_kokoro_worker, language="en", speed=speed).duration
                          for speed in (1.0, 1.5, 0.75))
    # The words go 1.5 times as fast; the pause after each sentence does not change.
    assert 0.6 < fast / normal < 0.8
    assert 1.2 < slow / normal < 1.45


def test_timings_are_the_chunks_spans_shared_out_by_character(released_kokoro_worker: str,
                                                              released_kokoro_chorus) -> None:
    """With no durations from the model, each chunk of text (a sentence) is timed by where its
    audio starts and ends, and its characters share that span evenly."""
    response = httpx.post(
        f"{released_kokoro_chorus.url}/v1/text-to-speech/jf_alpha/with-timestamps",
        params={"output_format": f"pcm_{RATE}"}, timeout=300,
        json={"text": TWO_SENTENCES, "model_id": CONFIG["name"], "language_code": "en"})
    assert response.status_code == 200, response.text
    body = response.json()
    alignment = body["alignment"]
    starts = np.array(alignment["character_start_times_seconds"])
    ends = np.array(alignment["character_end_times_seconds"])
    assert "".join(alignment["characters"]) == TWO_SENTENCES
    seconds = len(base64.b64decode(body["audio_base64"])) / 2 / RATE
    assert ends[-1] == pytest.approx(seconds, abs=0.01)
    # Each sentence is a chunk: the first sentence's span is its audio spoken alone, and the
    # second (the space before it included) follows it, as long as its own audio alone.
    boundary = TWO_SENTENCES.index(" Glue")
    first, second = (speak(released_kokoro_worker, sentence.strip(), language="en")
                     for sentence in (TWO_SENTENCES[:boundary], TWO_SENTENCES[boundary:]))
    assert starts[boundary] == pytest.approx(first.duration, abs=0.01)
    assert seconds == pytest.approx(first.duration + second.duration, abs=0.01)
    # Within each chunk every character lasts as long as the next.
    for span in (slice(0, boundary), slice(boundary, len(TWO_SENTENCES))):
        lengths = (ends - starts)[span]
        assert np.allclose(lengths, lengths[0], atol=0.002), lengths
