"""Every route of the three API families against a real `chorus serve` on loopback, with the
audio decoded back by PyAV: codec, sample rate, and a duration that fits the text."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from router.chunking import chunk_text
from router.settings import Settings
from tests._live import ScriptedRunner, live_app, piper_setup
from tests.audio import (
    LONGER_TEXT,
    MP3,
    OPUS,
    PIPER_RATE,
    SHORT_SECONDS,
    SHORT_TEXT,
    assert_speech,
    decode,
    parse_sse,
    pcm_seconds,
)


def assert_format(response: httpx.Response, fmt: str, content_type: str, container: str, codecs: set, rate: int) -> None:
    """`response` is speech in `fmt`: its media type, container, codec and rate."""
    assert response.headers["content-type"] == content_type
    audio = decode(response.content, raw="aac" if fmt == "aac" else None)
    assert audio.container == container
    assert audio.codec in codecs
    assert audio.sample_rate == rate
    assert_speech(audio)


def speech(client: httpx.Client, **body) -> httpx.Response:
    response = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", **body})
    assert response.status_code == 200, response.text
    return response


def eleven(client: httpx.Client, voice: str = "en_US-joe-medium", route: str = "", params=None, **body) -> httpx.Response:
    response = client.post(f"/v1/text-to-speech/{voice}{route}", params=params, json={"text": SHORT_TEXT, **body})
    assert response.status_code == 200, response.text
    return response


# --- LocalAI: POST /tts ---------------------------------------------------------------------


def test_localai_without_format_gives_wav_of_the_default_model(client):
    response = client.post("/tts", json={"input": SHORT_TEXT})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert response.content[:4] == b"RIFF" and response.content[8:12] == b"WAVE"
    audio = decode(response.content)
    assert (audio.codec, audio.sample_rate) == ("pcm_s16le", PIPER_RATE)
    assert_speech(audio)


@pytest.mark.parametrize("fmt", ["xyz", "pcm", "WAV"])
def test_localai_unknown_or_pcm_format_gives_wav(client, fmt):
    # LocalAI's own behaviour: anything it does not know, and its "pcm", is a WAV with a header.
    response = client.post("/tts", json={"model": "tts-1", "input": SHORT_TEXT, "response_format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert decode(response.content).codec == "pcm_s16le"


@pytest.mark.parametrize(
    "fmt, content_type, container, codecs, rate",
    [
        ("mp3", "audio/mpeg", "mp3", MP3, PIPER_RATE),
        # Real Opus in Ogg (LocalAI's own "opus" is Vorbis); Opus always decodes at 48 kHz.
        ("opus", "audio/ogg", "ogg", OPUS, 48000),
        ("flac", "audio/flac", "flac", {"flac"}, PIPER_RATE),
        ("aac", "audio/aac", "aac", {"aac"}, PIPER_RATE),
    ],
)
def test_localai_formats(client, fmt, content_type, container, codecs, rate):
    response = client.post("/tts", json={"input": SHORT_TEXT, "response_format": fmt})
    assert response.status_code == 200, response.text
    assert_format(response, fmt, content_type, container, codecs, rate)


def test_localai_voice_language_and_file_model(client):
    # A model file named directly with a backend, LocalAI-style, plus the voice and language fields.
    response = client.post(
        "/tts",
        json={
            "model": "en_US-joe-medium.onnx",
            "backend": "piper",
            "voice": "en_US-joe-medium",
            "language": "en",
            "input": SHORT_TEXT,
        },
    )
    assert response.status_code == 200, response.text
    assert_speech(decode(response.content))


def test_longer_text_gives_proportionally_longer_audio(client):
    short = decode(client.post("/tts", json={"input": SHORT_TEXT}).content).duration
    longer = decode(client.post("/tts", json={"input": LONGER_TEXT}).content).duration
    words = len(LONGER_TEXT.split()) / len(SHORT_TEXT.split())
    assert 0.6 * words < longer / short < 1.5 * words, (short, longer, words)


# --- OpenAI: POST /v1/audio/speech ----------------------------------------------------------


def test_openai_default_format_is_mp3(client):
    response = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    audio = decode(response.content)
    assert audio.codec in MP3 and audio.sample_rate == PIPER_RATE
    assert_speech(audio)


@pytest.mark.parametrize(
    "fmt, content_type, container, codecs, rate",
    [
        ("mp3", "audio/mpeg", "mp3", MP3, PIPER_RATE),
        ("opus", "audio/ogg", "ogg", OPUS, 48000),
        ("aac", "audio/aac", "aac", {"aac"}, PIPER_RATE),
        ("flac", "audio/flac", "flac", {"flac"}, PIPER_RATE),
        ("wav", "audio/wav", "wav", {"pcm_s16le"}, PIPER_RATE),
    ],
)
def test_openai_formats(client, fmt, content_type, container, codecs, rate):
    response = speech(client, input=SHORT_TEXT, response_format=fmt)
    assert_format(response, fmt, content_type, container, codecs, rate)


def test_openai_pcm_is_raw_s16le_at_24k(client):
    response = speech(client, input=SHORT_TEXT, response_format="pcm")
    assert response.headers["content-type"] == "audio/pcm"
    data = response.content
    assert data[:4] != b"RIFF" and len(data) % 2 == 0
    # No header: the byte count alone is the duration at 24 kHz, 2 bytes a sample.
    low, high = SHORT_SECONDS
    assert low * 48000 <= len(data) <= high * 48000
    audio = decode(data, raw="pcm", rate=24000)
    assert_speech(audio)
    assert audio.duration == pytest.approx(pcm_seconds(data))


def test_openai_speed_is_applied(client):
    durations = {
        speed: pcm_seconds(speech(client, input=SHORT_TEXT, response_format="pcm", speed=speed).content)
        for speed in (0.5, 1.0, 2.0)
    }
    assert durations[2.0] < 0.75 * durations[1.0], durations
    assert durations[0.5] > 1.5 * durations[1.0], durations


@pytest.mark.parametrize("voice", ["alloy", "nova", {"id": "alloy"}, {"id": "en_US-joe-medium"}, "en_US-joe-medium"])
def test_openai_voice_names_and_object_form(client, voice):
    response = speech(client, input=SHORT_TEXT, voice=voice, response_format="wav")
    assert_speech(decode(response.content))


def test_openai_instructions_accepted(client):
    response = speech(client, input=SHORT_TEXT, instructions="Speak in a cheerful tone.", response_format="wav")
    assert_speech(decode(response.content))


@pytest.mark.parametrize("fmt", ["mp3", "pcm"])
def test_openai_sse_stream(client, fmt):
    response = speech(client, input=SHORT_TEXT, response_format=fmt, stream_format="sse")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.content)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2, "the audio should arrive in several events"
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] > 0
    assert {e["type"] for e in events} == {"speech.audio.delta", "speech.audio.done"}
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    decoded = decode(audio, raw="pcm" if fmt == "pcm" else None, rate=24000 if fmt == "pcm" else None)
    assert decoded.codec in (MP3 if fmt == "mp3" else {"pcm_s16le"})
    assert_speech(decoded)


# --- ElevenLabs: POST /v1/text-to-speech/{voice_id}[/stream] -------------------------------


@pytest.mark.parametrize("route", ["", "/stream"])
def test_elevenlabs_default_is_mp3_44100_128(client, route):
    response = eleven(client, route=route)
    assert response.headers["content-type"] == "audio/mpeg"
    audio = decode(response.content)
    assert audio.codec in MP3 and audio.sample_rate == 44100
    assert_speech(audio)
    assert 0.7 * 128 < len(response.content) * 8 / 1000 / audio.duration < 1.3 * 128


def test_elevenlabs_voice_settings_speed_is_applied(client):
    def seconds(speed=None):
        body = {"voice_settings": {"speed": speed, "stability": 0.5}} if speed else {}
        response = eleven(client, params={"output_format": "pcm_16000"}, text=LONGER_TEXT, **body)
        return pcm_seconds(response.content, 16000)

    # ElevenLabs' range is narrow (0.7-1.2) and Piper's response to it sublinear (1.2 gives about
    # 0.91x the length): the longer text keeps Piper's random timing noise below that difference.
    normal, fast, slow = seconds(), seconds(1.2), seconds(0.7)
    assert fast < 0.96 * normal and slow > 1.2 * normal, (fast, normal, slow)


def test_elevenlabs_language_code_seed_and_model_accepted(client):
    params = {"output_format": "wav_24000", "optimize_streaming_latency": 3, "enable_logging": "false"}
    response = eleven(client, params=params, model_id="tts-1", language_code="en", seed=42)
    assert_speech(decode(response.content))


# --- Listings and health ---------------------------------------------------------------------


def test_elevenlabs_voices(client):
    response = client.get("/v1/voices")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    voices = response.json()["voices"]
    joe = next(v for v in voices if v["voice_id"] == "en_US-joe-medium")
    assert joe["name"] == "en_US-joe-medium"
    assert {"category", "labels", "preview_url"} <= joe.keys()
    assert "tts-1" in joe["high_quality_base_model_ids"]


def test_elevenlabs_v2_voices_and_search(client):
    body = client.get("/v2/voices").json()
    assert body["has_more"] is False and body["total_count"] == len(body["voices"]) >= 1
    assert client.get("/v2/voices", params={"search": "JOE"}).json()["total_count"] >= 1
    assert client.get("/v2/voices", params={"search": "no such voice"}).json()["voices"] == []


def test_openai_models_list(client):
    response = client.get("/v1/models")
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "list"
    model = next(m for m in body["data"] if m["id"] == "tts-1")
    assert model["object"] == "model" and "owned_by" in model


def test_models_in_elevenlabs_shape_for_its_clients(client):
    body = client.get("/v1/models", headers={"xi-api-key": "x"}).json()
    assert isinstance(body, list)
    model = next(m for m in body if m["model_id"] == "tts-1")
    assert model["can_do_text_to_speech"] is True
    assert model["languages"] == [{"language_id": "en", "name": "en"}]


def test_openai_audio_voices(client):
    voices = client.get("/v1/audio/voices").json()["voices"]
    assert {"id": "en_US-joe-medium", "name": "en_US-joe-medium", "model": "tts-1", "confirmed": True} in voices


def test_open_webui_lists_the_speech_models_and_each_speaks(client):
    """Open WebUI fills its TTS model menu from GET /v1/audio/models; a prompt model (MusicGen)
    makes no speech and is not offered."""
    listed = client.get("/v1/audio/models").json()
    ids = [model["id"] for model in listed["models"]]
    assert "tts-1" in ids and "musicgen" not in ids
    served = [model["id"] for model in client.get("/v1/models").json()["data"]]
    assert "musicgen" in served and set(ids) < set(served)
    response = client.post("/v1/audio/speech", json={"model": ids[0], "input": "Hi.", "voice": "alloy",
                                                     "response_format": "wav"})
    assert response.status_code == 200 and decode(response.content).duration > 0.2


def test_health_and_readiness(client):
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"status": status}


# --- Streaming and responsiveness ------------------------------------------------------------

# About 2,000 characters in 30 sentences.
LONG_TEXT = " ".join(
    f"Sentence number {i} is here to make the text long enough to stream." for i in range(1, 31)
)


def test_long_text_streams_and_health_stays_prompt(tmp_path):
    """One long request shows both: its first audio leaves while the rest of the text is still
    to be made, and the event loop keeps answering /healthz while the backend works. In process,
    around real Piper, so that the backend's state can be seen: the second chunk is held at its
    gate until the first audio is in, the last one until /healthz has answered meanwhile. (The
    figures, first byte against the whole and /healthz's latency: bench/speech.py (b) and
    bench/responsiveness.py.)"""
    assert len(LONG_TEXT) > 1900
    chunks = chunk_text(LONG_TEXT, Settings.model_fields["chunk_chars"].default)
    second, last = chunks[1], chunks[-1]
    configs, models = piper_setup(tmp_path)
    runner = ScriptedRunner(models, gated=[second, last])
    # Double speed halves the audio (and so the test's time) without changing how it streams.
    body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm", "speed": 2.0}
    stop = threading.Event()
    answered_during = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=url, timeout=30) as probe:
            while not stop.is_set():
                assert probe.get("/healthz").status_code == 200
                if runner.holding:
                    answered_during.set()
                stop.wait(0.05)  # pacing, not waiting for anything

    with live_app(configs, models, runner) as url, ThreadPoolExecutor(1) as pool:
        prober = pool.submit(probe_health)
        try:
            # The client's timeout only turns a server that waits for the whole text into a failure.
            with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as response:
                assert response.status_code == 200
                pieces = response.iter_raw()
                size = len(next(pieces))
                assert size, "no audio in the first piece"
                # In while the second chunk cannot have been made: its gate is still shut.
                begun_at_first_audio = runner.begun
                assert second not in runner.pcm_by_text
                runner.wait_at_gate(second)
                runner.open_gate(second)
                runner.wait_at_gate(last)  # every other chunk has been made meanwhile
                assert answered_during.wait(60), "/healthz did not answer while the backend worked"
                runner.open_gate(last)
                size += sum(len(piece) for piece in pieces)
        finally:
            stop.set()
            runner.open_all()
        prober.result()
    assert begun_at_first_audio < len(chunks), "the first audio waited for every chunk to begin"
    assert runner.begun == len(chunks)
    # Every sentence made it: about 1.5 s each at normal speed, halved (OpenAI's pcm: 24 kHz).
    assert size / 48000 > 30 * 0.4
