"""The synthesis cache: an identical request is answered from disk (X-Chorus-Cache: hit) without
touching the backend; anything that changes the audio misses; only complete responses are
stored, atomically; the size cap holds with least-recently-used eviction; it survives a
restart; and it is off unless a directory is set."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import decode

from tests._live import DIE, ScriptedRunner, live_app, piper_setup

SPEECH = "/v1/audio/speech"
TEXT = "A sentence worth keeping."


def body(**changes: object) -> dict:
    return {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav", **changes}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return piper_setup(tmp_path_factory.mktemp("cache"))


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.audio"))


def test_identical_requests_hit_and_cost_no_backend_time(setup, tmp_path):
    configs, models = setup
    runner = ScriptedRunner(models)
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, cache_dir=cache) as url, httpx.Client(base_url=url, timeout=60) as client:
        miss = client.post(SPEECH, json=body())
        assert miss.status_code == 200 and miss.headers["x-chorus-cache"] == "miss"
        begun = runner.begun
        start = time.perf_counter()
        hit = client.post(SPEECH, json=body())
        hit_seconds = time.perf_counter() - start
        assert hit.headers["x-chorus-cache"] == "hit"
        assert hit.headers["content-type"] == miss.headers["content-type"]
        assert hit.content == miss.content
        assert runner.begun == begun, "a hit must not call the backend"
        assert decode(hit.content).duration > 1.0
        assert hit_seconds < 1.0
        # The same request through another family with the same output is the same audio,
        # but ElevenLabs asks for another format: its own entry.
        eleven = client.post("/v1/text-to-speech/alloy", params={"output_format": "wav_22050"}, json={"text": TEXT})
        assert eleven.headers["x-chorus-cache"] == "miss"
        metrics = client.get("/metrics").text
        assert 'chorus_cache_requests_total{result="hit"} 1.0' in metrics
        assert 'chorus_cache_requests_total{result="miss"} 2.0' in metrics


@pytest.mark.parametrize(
    "change",
    [
        {"input": TEXT + " And more."},
        {"speed": 1.5},
        {"response_format": "mp3"},
        {"response_format": "pcm"},
        {"instructions": "Whisper it."},
    ],
    ids=["text", "speed", "format", "pcm", "instructions"],
)
def test_anything_that_changes_the_audio_misses(setup, tmp_path, change):
    configs, models = setup
    with live_app(configs, models, cache_dir=tmp_path / "cache") as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        assert client.post(SPEECH, json=body(**change)).headers["x-chorus-cache"] == "miss"
        assert client.post(SPEECH, json=body(**change)).headers["x-chorus-cache"] == "hit"


def test_new_weights_under_the_same_name_miss(setup, tmp_path):
    configs, models = setup
    with live_app(configs, models, cache_dir=tmp_path / "cache") as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        voice = models / "en_US-joe-medium.onnx"
        stat = voice.stat()
        # Touch the weights: what was cached was made by other ones.
        import os

        os.utime(voice, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"


def test_failed_and_abandoned_responses_are_not_stored(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    runner = ScriptedRunner(models)
    with live_app(configs, models, runner, cache_dir=cache, chunk_chars=60) as url, httpx.Client(base_url=url, timeout=60) as client:
        broken = f"The first part is fine. {DIE} is what the second part does."
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(SPEECH, json=body(input=broken))
        long_text = " ".join(f"Sentence {n} that nobody waits for." for n in range(20))
        with client.stream("POST", SPEECH, json=body(input=long_text)) as response:
            next(response.iter_raw())
        time.sleep(1)
        assert entries(cache) == []
        assert list((cache / "partial").iterdir()) == []
        # A broken take never comes back as a hit.
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(SPEECH, json=body(input=broken))


def test_size_cap_evicts_least_recently_used(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    # One sentence as WAV is about 80 kB: the cap holds two entries, not three.
    with live_app(configs, models, cache_dir=cache, cache_max_mb=0.2) as url, httpx.Client(base_url=url, timeout=60) as client:
        texts = ["First of three sentences.", "Second of three sentences.", "Third of three sentences."]
        for text in texts[:2]:
            assert client.post(SPEECH, json=body(input=text)).headers["x-chorus-cache"] == "miss"
        assert len(entries(cache)) == 2
        # Use the first again, so the second is now the least recently used.
        assert client.post(SPEECH, json=body(input=texts[0])).headers["x-chorus-cache"] == "hit"
        assert client.post(SPEECH, json=body(input=texts[2])).headers["x-chorus-cache"] == "miss"
        assert len(entries(cache)) == 2
        assert sum(path.stat().st_size for path in entries(cache)) <= 0.2 * 1024 * 1024
        assert client.post(SPEECH, json=body(input=texts[0])).headers["x-chorus-cache"] == "hit"
        assert client.post(SPEECH, json=body(input=texts[1])).headers["x-chorus-cache"] == "miss"


def test_entries_survive_a_restart(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    with live_app(configs, models, cache_dir=cache) as url:
        first = httpx.post(f"{url}{SPEECH}", json=body(), timeout=60)
    with live_app(configs, models, cache_dir=cache) as url:
        again = httpx.post(f"{url}{SPEECH}", json=body(), timeout=60)
    assert again.headers["x-chorus-cache"] == "hit" and again.content == first.content


def test_off_without_a_directory_or_with_size_zero(setup, tmp_path):
    configs, models = setup
    for settings in ({}, {"cache_dir": tmp_path / "cache", "cache_max_mb": 0}):
        with live_app(configs, models, **settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(2):
                response = client.post(SPEECH, json=body())
                assert response.status_code == 200 and "x-chorus-cache" not in response.headers
    assert not (tmp_path / "cache").exists()
