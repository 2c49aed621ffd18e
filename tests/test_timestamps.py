"""When each character is heard: the timeline that times chunks and words, Piper's measured word
times and how they travel (in process, framed from a worker), and ElevenLabs' timestamp routes
through its own SDK against a live server."""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from functions.config import ModelConfig
from functions.piper import PiperBackend
from functions.protocol import FRAMED_MEDIA_TYPE, FrameReader, SynthesisRequest, WordTimes, frame
from functions.worker import create_app as create_worker
from router.alignment import CharTimes, Timeline
from router.chunking import chunk_text
from router.runners.http import HttpRunner
from tests._live import assert_family_error
from tests.audio import PIPER_RATE, decode
from tests.processes import serving

elevenlabs = pytest.importorskip("elevenlabs")

VOICE = "en_US-joe-medium"
TEXT = "Hello world, this is Chorus.  It reads every word aloud!\n\nAnd then it stops. "


def assert_continuous(times: CharTimes, text: str, seconds: float) -> None:
    """Every character of `text`, in order, each starting where the one before it ended, from
    0 to the audio's real length."""
    assert "".join(times.characters) == text
    assert times.starts[0] == pytest.approx(0, abs=1e-6)
    for i in range(len(text)):
        assert times.starts[i] <= times.ends[i]
        if i:
            assert times.starts[i] == pytest.approx(times.ends[i - 1], abs=1e-6)
    assert times.ends[-1] == pytest.approx(seconds, abs=1e-3)


# --- the timeline ---------------------------------------------------------------------------


def test_chunks_without_word_times_spread_their_characters_over_their_own_audio() -> None:
    timeline = Timeline(sample_rate=1000)
    times = CharTimes()
    lengths = []
    for chunk in chunk_text(TEXT, 30):
        lengths.append(len(chunk) * 10 + 100)  # samples: any length the backend made
        times.extend(timeline.chunk(TEXT, chunk, lengths[-1], []))
    times.extend(timeline.rest(TEXT))
    assert_continuous(times, TEXT, sum(lengths) / 1000)
    # Each chunk's last character ends exactly where its audio does.
    first = chunk_text(TEXT, 30)[0]
    assert times.ends[TEXT.index(first) + len(first) - 1] == pytest.approx(lengths[0] / 1000)


def test_measured_words_are_where_the_backend_heard_them() -> None:
    text = "One two three."
    # "two" starts at 0.4 s and ends at 0.5 s; the chunk's audio lasts 1 s.
    words = WordTimes(((0, 3, 0, 300), (4, 7, 400, 500), (8, 14, 600, 900)))
    times = Timeline(sample_rate=1000).chunk(text, text, 1000, [words])
    assert_continuous(times, text, 1.0)
    assert times.starts[4] == pytest.approx(0.4)
    assert times.ends[6] == pytest.approx(0.5)
    # Within a word, its characters share its time evenly; the space takes the pause.
    assert times.ends[4] - times.starts[4] == pytest.approx(0.1 / 3)
    assert (times.starts[3], times.ends[3]) == (pytest.approx(0.3), pytest.approx(0.4))


def test_whitespace_the_chunker_dropped_is_timed_with_the_next_chunk() -> None:
    text = "First one.\n\n   Second one."
    timeline = Timeline(sample_rate=100)
    first = timeline.chunk(text, "First one.", 100, [])
    second = timeline.chunk(text, "Second one.", 200, [])
    assert "".join(first.characters) == "First one."
    assert "".join(second.characters) == "\n\n   Second one."
    assert second.starts[0] == pytest.approx(1.0)
    assert second.ends[-1] == pytest.approx(3.0)


# --- how word times travel ------------------------------------------------------------------


def test_frames_survive_any_split_and_a_cut_frame_is_noticed() -> None:
    items = [WordTimes(((0, 5, 10, 2000),)), b"\x01\x02" * 500, WordTimes(((6, 9, 2100, 3000),)), b"\x03\x04" * 7]
    data = b"".join(frame(item) for item in items)
    rng = random.Random(1)
    reader, got = FrameReader(), []
    at = 0
    while at < len(data):
        step = rng.randint(1, 300)
        got += reader.feed(data[at:at + step])
        at += step
    assert got == items and not reader.partial
    cut = FrameReader()
    cut.feed(data[:-3])
    assert cut.partial


@pytest.fixture(scope="module")
def models(piper_models: Path) -> Path:
    return piper_models


@pytest.fixture(scope="module")
def piper(models: Path) -> PiperBackend:
    backend = PiperBackend(ModelConfig(name="tts-1", backend="piper", parameters={"model": f"{VOICE}.onnx"}), models)
    backend.load()
    return backend


def test_piper_measures_each_word_before_its_sentence_is_heard(piper: PiperBackend) -> None:
    text = "Hello world, this is Chorus. It reads aloud!"
    items = list(piper.synthesize(SynthesisRequest(model="tts-1", text=text, word_times=True)))
    kinds = ["words" if isinstance(item, WordTimes) else "pcm" for item in items]
    assert kinds == ["words", "pcm", "words", "pcm"]  # one of each per sentence, times first
    words = [word for item in items if isinstance(item, WordTimes) for word in item.words]
    assert [text[start:end] for start, end, _, _ in words] == text.split()
    samples = sum(len(item) // 2 for item in items if isinstance(item, bytes))
    ends = [after for _, _, _, after in words]
    starts = [first for _, _, first, _ in words]
    assert starts == sorted(starts) and all(a <= b for a, b in zip(starts, ends, strict=True))
    assert 0 < ends[-1] <= samples
    # The second sentence starts after the first one's audio.
    first_audio = len(items[1]) // 2
    assert items[2].words[0][2] >= first_audio


def test_piper_stops_timing_words_where_espeak_reads_them_otherwise(piper: PiperBackend) -> None:
    # "1990" is spoken as two words: the words after it in that sentence cannot be matched.
    text = "Good morning. It was 1990 then. Bye."
    items = list(piper.synthesize(SynthesisRequest(model="tts-1", text=text, word_times=True)))
    timed = [text[start:end] for item in items if isinstance(item, WordTimes) for start, end, _, _ in item.words]
    assert timed == ["Good", "morning."]
    assert sum(isinstance(item, bytes) for item in items) == 3


def test_piper_gives_no_word_times_unless_asked(piper: PiperBackend) -> None:
    items = list(piper.synthesize(SynthesisRequest(model="tts-1", text="Hello there.")))
    assert items and all(isinstance(item, bytes) for item in items)


def test_a_worker_frames_word_times_and_http_mode_reads_them_back(models: Path, tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tts-1.yaml").write_text(f"name: tts-1\nbackend: piper\nparameters:\n  model: {VOICE}.onnx\n")
    config = ModelConfig(name="tts-1", backend="piper", parameters={"model": f"{VOICE}.onnx"})
    request = SynthesisRequest(model="tts-1", text="Hello world. Goodbye now.", word_times=True)
    app = create_worker("piper", configs, models)
    with TestClient(app) as worker:
        # The worker loads in the background and offers no event: its /healthz is polled, with a
        # deadline that only turns a worker that never loads into a failure.
        deadline = time.monotonic() + 60
        while (health := worker.get("/healthz")).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.05)
        response = worker.post("/synthesize", json={"config": config.model_dump(mode="json"),
                                                     "request": request.model_dump(mode="json")})
        assert response.headers["content-type"] == FRAMED_MEDIA_TYPE
        reader = FrameReader()
        items = reader.feed(response.content)
        assert not reader.partial
        assert [type(item) for item in items] == [WordTimes, bytes, WordTimes, bytes]
        plain = worker.post("/synthesize", json={"config": config.model_dump(mode="json"),
                                                  "request": {**request.model_dump(mode="json"), "word_times": False}})
        assert plain.headers["content-type"] == "application/octet-stream"

    import anyio

    async def through_http_mode() -> list[object]:
        with serving(create_worker("piper", configs, models), ready_path="/healthz") as url:
            runner = HttpRunner({"piper": url})
            stream = await runner.stream(config, request)
            got = [item async for item in stream.audio]
            await runner.close()
            return got

    got = anyio.run(through_http_mode)
    assert [type(item) for item in got if isinstance(item, WordTimes)] == [WordTimes, WordTimes]
    words = [word for item in got if isinstance(item, WordTimes) for word in item.words]
    assert [request.text[s:e] for s, e, _, _ in words] == request.text.split()


# --- the routes, through ElevenLabs' SDK ------------------------------------------------------


@pytest.fixture(scope="module")
def xi(server):
    from elevenlabs.client import ElevenLabs

    return ElevenLabs(base_url=server.url, api_key="x", timeout=120)


def test_with_timestamps_times_every_character_to_the_audio_s_end(xi) -> None:
    result = xi.text_to_speech.convert_with_timestamps(VOICE, text=TEXT, output_format="pcm_22050")
    pcm = base64.b64decode(result.audio_base_64)
    seconds = len(pcm) / 2 / PIPER_RATE
    assert 3.0 < seconds < 9.0
    alignment = result.alignment
    times = CharTimes(alignment.characters, alignment.character_start_times_seconds,
                      alignment.character_end_times_seconds)
    assert_continuous(times, TEXT, round(seconds, 3))
    assert result.normalized_alignment.characters == alignment.characters


def test_with_timestamps_word_times_follow_the_speech(xi) -> None:
    """Piper's words are measured, not spread: a word's start is where its sound begins, so the
    quiet before "world" (after "Hello,") is timed to the comma and space, not to letters."""
    text = "Hello, world."
    result = xi.text_to_speech.convert_with_timestamps(VOICE, text=text, output_format="pcm_22050")
    pcm = np.frombuffer(base64.b64decode(result.audio_base_64), dtype="<i2").astype(np.float32)
    alignment = result.alignment
    w_start = alignment.character_start_times_seconds[text.index("world")]
    h_end = alignment.character_end_times_seconds[text.index(",") - 1]
    assert w_start > h_end  # the pause between the words belongs to ", "
    # Loudness: "world" sounds from where it is said to start.
    window = int(0.05 * PIPER_RATE)
    after = pcm[int(w_start * PIPER_RATE):int(w_start * PIPER_RATE) + 4 * window]
    assert np.sqrt(np.mean(after ** 2)) > 300


def test_stream_with_timestamps_gives_json_lines_that_add_up(xi, server) -> None:
    chunks = list(xi.text_to_speech.stream_with_timestamps(VOICE, text=TEXT, output_format="pcm_22050"))
    assert len(chunks) >= 3  # one line per piece of audio, not one at the end
    pcm = b"".join(base64.b64decode(chunk.audio_base_64) for chunk in chunks)
    times = CharTimes()
    for chunk in chunks:
        if chunk.alignment is not None:
            times.extend(CharTimes(chunk.alignment.characters, chunk.alignment.character_start_times_seconds,
                                   chunk.alignment.character_end_times_seconds))
    assert_continuous(times, TEXT, round(len(pcm) / 2 / PIPER_RATE, 3))
    with httpx.stream("POST", f"{server.url}/v1/text-to-speech/{VOICE}/stream/with-timestamps",
                      json={"text": TEXT}, timeout=120) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    mp3 = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
    assert decode(mp3).codec in ("mp3", "mp3float")


@pytest.mark.parametrize("suffix", ["with-timestamps", "stream/with-timestamps"])
def test_timestamp_routes_refuse_in_elevenlabs_shape(client, suffix) -> None:
    unknown = client.post(f"/v1/text-to-speech/nobody/{suffix}", json={"text": "Hi there."})
    assert_family_error(unknown, 404, code="voice_not_found")
    empty = client.post(f"/v1/text-to-speech/{VOICE}/{suffix}", json={"text": "  "})
    assert_family_error(empty, 400, code="invalid_request")
    bad = client.post(f"/v1/text-to-speech/{VOICE}/{suffix}?output_format=mp3_1_2", json={"text": "Hi."})
    assert_family_error(bad, 400, code="invalid_request")
    assert client.post(f"/v1/text-to-speech/{VOICE}/{suffix}", json={"text": "Still speaking."}).status_code == 200
