"""Overload: more concurrent requests than a model's limit plus its queue. Every request either
completes with whole, decodable audio or is refused with 429/503 and Retry-After in its family's
shape; none hangs; nothing truncated passes for success; /healthz answers throughout.

The admitted syntheses are held at their second chunk (a ScriptedRunner gate) until the rest of
the burst has been answered, so that who is served, queued or refused does not depend on how fast
the machine synthesises. (How promptly /healthz answers under such a burst: bench/responsiveness.py.)"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import pytest

from router.chunking import chunk_text
from tests._live import ScriptedRunner, assert_family_error, live_app, piper_setup
from tests.audio import decode

TEXT = "The server is busy today. Some of you will have to come back later, and that is fine."
#: TEXT's second chunk, where the admitted syntheses wait until the burst has been sorted out.
HELD = chunk_text(TEXT, 250)[1]
#: The model's limit (max_concurrent_inputs): syntheses running at once.
LIMIT = 2


def request(url: str, index: int) -> tuple[int, httpx.Response]:
    # Alternate families: the refusals must come in each one's own shape. The client's timeout
    # only turns a hang into a failure.
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


class HealthProbe:
    """/healthz asked over and over from a thread of its own until stopped; every answer must be
    200. `during` counts those answered while a synthesis held the model."""

    def __init__(self, url: str, runner: ScriptedRunner) -> None:
        self.url, self.runner = url, runner
        self.stop = threading.Event()
        self.answered_during = threading.Event()
        self.during = 0

    def run(self) -> int:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                assert client.get("/healthz").status_code == 200
                if self.runner.holding:
                    self.during += 1
                    self.answered_during.set()
                self.stop.wait(0.02)  # pacing, not waiting for anything
        return self.during


def first_answered(futures: list[Future], count: int, timeout: float = 60) -> None:
    """Until `count` of `futures` are done (a hang guard of `timeout` seconds)."""
    if count:
        for answered, _ in enumerate(as_completed(futures, timeout=timeout), start=1):
            if answered == count:
                return


def run_burst(url: str, runner: ScriptedRunner, clients: int, turned_away: int) -> tuple[list[httpx.Response], int]:
    """`clients` requests at once. The `LIMIT` admitted ones are held at their second chunk until
    `turned_away` requests have been answered (refused) and /healthz has answered while they
    were held; then they go on, and the queued ones after them. Returns the responses in request
    order and how many /healthz probes were answered while a synthesis held the model."""
    probe = HealthProbe(url, runner)
    with ThreadPoolExecutor(clients + 1) as pool:
        health = pool.submit(probe.run)
        try:
            futures = [pool.submit(request, url, i) for i in range(clients)]
            runner.wait_at_gate(HELD, LIMIT)
            first_answered(futures, turned_away)
            assert probe.answered_during.wait(60), "/healthz did not answer while the syntheses were held"
            runner.open_gate(HELD)
            results = sorted(future.result() for future in futures)
        finally:
            probe.stop.set()
            runner.open_all()
        return [response for _, response in results], health.result()


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
    return piper_setup(tmp_path_factory.mktemp("overload"), max_concurrent_inputs=LIMIT)


@pytest.fixture(scope="module")
def expected_seconds(setup) -> float:
    configs, models = setup
    with live_app(configs, models) as url:
        return decode(request(url, 0)[1].content).duration


def test_past_the_queue_requests_are_refused_with_retry_after(setup, expected_seconds):
    configs, models = setup
    runner = ScriptedRunner(models, gated=[HELD])
    # 2 running + 2 waiting: of 10 at once, the other 6 are turned away at the door.
    with live_app(configs, models, runner, max_queue=2, queue_timeout=60) as url:
        responses, during = run_burst(url, runner, 10, turned_away=6)
        outcomes = [check_outcome(response, expected_seconds) for response in responses]
        assert outcomes.count("ok") == 4
        assert outcomes.count("refused") == 6
        assert {r.status_code for r in responses} == {200, 429}
        assert during > 0
        # Nothing is left holding a place: a request after the burst is served, not queued
        # behind a ghost.
        runner.wait_idle()
        assert check_outcome(request(url, 0)[1], expected_seconds) == "ok"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'chorus_rejected_requests_total{model="tts-1"} 6.0' in metrics
        assert 'chorus_queue_depth{model="tts-1"} 0.0' in metrics


def test_a_request_that_waits_too_long_gets_503(setup, expected_seconds):
    configs, models = setup
    runner = ScriptedRunner(models, gated=[HELD])
    # A long queue but a short patience: the waiting ones give up with 503 while the admitted
    # ones are held, none hangs.
    with live_app(configs, models, runner, max_queue=50, queue_timeout=0.3) as url:
        responses, during = run_burst(url, runner, 8, turned_away=8 - LIMIT)
        outcomes = [check_outcome(response, expected_seconds) for response in responses]
        assert outcomes.count("ok") == LIMIT and outcomes.count("refused") == 8 - LIMIT
        assert {r.status_code for r in responses} == {200, 503}
        assert during > 0


def test_within_the_limit_everyone_is_served(setup, expected_seconds):
    configs, models = setup
    runner = ScriptedRunner(models, gated=[HELD])
    with live_app(configs, models, runner, max_queue=16, queue_timeout=60) as url:
        responses, during = run_burst(url, runner, 6, turned_away=0)
        assert [check_outcome(response, expected_seconds) for response in responses] == ["ok"] * 6
        assert during > 0
