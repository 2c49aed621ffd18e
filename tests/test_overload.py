"""Overload: more concurrent requests than a model's limit plus its queue. Every request either
completes with whole, decodable audio or is refused with 429/503 and Retry-After in its family's
shape; none hangs; nothing truncated passes for success; /healthz answers promptly throughout."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests._live import assert_family_error, live_app, piper_setup
from tests.audio import decode

TEXT = "The server is busy today. Some of you will have to come back later, and that is fine."


def request(url: str, index: int) -> tuple[int, httpx.Response]:
    # Alternate families: the refusals must come in each one's own shape.
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60)) as client:
        if index % 2:
            return index, client.post(
                "/v1/text-to-speech/en_US-joe-medium", params={"output_format": "mp3_44100_128"},
                json={"text": TEXT},
            )
        return index, client.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"},
        )


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    return latencies


def run_burst(url: str, clients: int) -> tuple[list[httpx.Response], list[float], float]:
    stop = threading.Event()
    with ThreadPoolExecutor(clients + 1) as pool:
        health = pool.submit(health_latencies, url, stop)
        start = time.perf_counter()
        results = sorted(pool.map(lambda i: request(url, i), range(clients)))
        elapsed = time.perf_counter() - start
        stop.set()
        return [response for _, response in results], health.result(), elapsed


def check_outcome(response: httpx.Response, expected: float) -> str:
    if response.status_code == 200:
        audio = decode(response.content)
        assert abs(audio.duration - expected) < 0.5, f"{audio.duration:.2f} s, expected ~{expected:.2f} s"
        return "ok"
    assert response.status_code in (429, 503), response.text
    assert_family_error(response)
    assert 1 <= int(response.headers["retry-after"]) <= 60
    return "refused"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return piper_setup(tmp_path_factory.mktemp("overload"), max_concurrent_inputs=2)


@pytest.fixture(scope="module")
def expected_seconds(setup) -> float:
    configs, models = setup
    with live_app(configs, models) as url:
        return decode(request(url, 0)[1].content).duration


def test_past_the_queue_requests_are_refused_with_retry_after(setup, expected_seconds):
    configs, models = setup
    # 2 running + 2 waiting: of 10 at once, at least 6 must be turned away at the door.
    with live_app(configs, models, max_queue=2, queue_timeout=60) as url:
        responses, health, _ = run_burst(url, 10)
        outcomes = [check_outcome(response, expected_seconds) for response in responses]
        assert outcomes.count("ok") >= 4
        assert outcomes.count("refused") >= 1
        assert max(health) < 0.5, f"/healthz took up to {max(health):.3f} s under load"
        # Nothing is left holding a place: a request after the burst is served at once.
        assert check_outcome(request(url, 0)[1], expected_seconds) == "ok"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'chorus_rejected_requests_total{model="tts-1"}' in metrics
        assert 'chorus_queue_depth{model="tts-1"} 0.0' in metrics


def test_a_request_that_waits_too_long_gets_503(setup, expected_seconds):
    configs, models = setup
    # A long queue but a short patience: the waiting ones give up with 503, none hangs.
    with live_app(configs, models, max_queue=50, queue_timeout=0.3) as url:
        responses, health, elapsed = run_burst(url, 8)
        outcomes = [check_outcome(response, expected_seconds) for response in responses]
        assert "refused" in outcomes and "ok" in outcomes
        assert {r.status_code for r in responses} <= {200, 503}
        assert max(health) < 0.5
        assert elapsed < 30


def test_within_the_limit_everyone_is_served(setup, expected_seconds):
    configs, models = setup
    with live_app(configs, models, max_queue=16, queue_timeout=60) as url:
        responses, health, _ = run_burst(url, 6)
        assert [check_outcome(response, expected_seconds) for response in responses] == ["ok"] * 6
        assert max(health) < 0.5
