"""/metrics in Prometheus text format: requests by route, status and model; latency and time to
first byte; audio seconds; real-time factor; in-flight and queue depth; backend errors. Parsed
with prometheus_client's own parser, after real traffic."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._live import RAISE, ScriptedRunner, live_app, piper_setup


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, httpx.Response]:
    configs, models = piper_setup(tmp_path_factory.mktemp("metrics"))
    runner = ScriptedRunner(models)
    with live_app(configs, models, runner) as url, httpx.Client(base_url=url, timeout=60) as client:
        speech = client.post(
            "/v1/text-to-speech/alloy", params={"output_format": "pcm_22050"},
            json={"text": "Counting the seconds of audio. Two sentences of it."},
        )
        assert speech.status_code == 200
        client.post("/v1/audio/speech", json={"model": "tts-1", "input": RAISE, "voice": "alloy"})
        client.post("/v1/audio/speech", json={"model": "nope", "input": "Hi.", "voice": "alloy"})
        client.get("/no/such/path/12345")
        response = client.get("/metrics")
    # The exposition format, and the header that says so.
    assert response.headers["content-type"].startswith("text/plain; version="), response.headers
    return samples(response.text), response.text, speech


def test_content_type_is_prometheus_text(scraped):
    # (the header is checked where the fixture scrapes; here, what it announced)
    _, text, _ = scraped
    assert "# TYPE chorus_requests_total counter" in text


def test_requests_by_route_status_and_model(scraped):
    found, _, _ = scraped
    assert value(found, "chorus_requests_total", route="/v1/text-to-speech/{voice_id}", status="200", model="tts-1") == 1
    assert value(found, "chorus_requests_total", route="/v1/audio/speech", status="500", model="tts-1") == 1
    assert value(found, "chorus_requests_total", route="/v1/audio/speech", status="404", model="") == 1
    # Unknown paths share one series: a client cannot create series at will.
    assert value(found, "chorus_requests_total", route="other", status="404", model="") == 1
    assert not any("/no/such/path" in str(labels) for _, labels in found)


def test_latency_and_time_to_first_byte(scraped):
    found, _, _ = scraped
    route = "/v1/text-to-speech/{voice_id}"
    assert value(found, "chorus_request_duration_seconds_count", route=route) == 1
    assert value(found, "chorus_time_to_first_byte_seconds_count", route=route) == 1
    total = value(found, "chorus_request_duration_seconds_sum", route=route)
    first = value(found, "chorus_time_to_first_byte_seconds_sum", route=route)
    assert 0 < first <= total


def test_audio_seconds_and_real_time_factor(scraped):
    found, _, speech = scraped
    seconds = len(speech.content) / 2 / 22050
    assert value(found, "chorus_audio_seconds_total", model="tts-1") == pytest.approx(seconds, rel=1e-3)
    assert value(found, "chorus_real_time_factor_count", model="tts-1") == 1
    assert 0 < value(found, "chorus_real_time_factor_sum", model="tts-1") < 5


def test_backend_errors_and_gauges(scraped):
    found, _, _ = scraped
    assert value(found, "chorus_backend_errors_total", model="tts-1", code="synthesis_failed") == 1
    assert value(found, "chorus_in_flight_requests", model="tts-1") == 0
    assert value(found, "chorus_queue_depth", model="tts-1") == 0
