"""The backend worker (functions/worker.py) hosting the real Piper backend: its protocol, its
errors, its readiness, and that a client going away stops the synthesis."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

import functions
from functions.piper import PiperBackend
from functions.worker import create_app
from tests.processes import serving

VOICE = "en_US-joe-medium.onnx"
TTS1 = {"name": "tts-1", "backend": "piper", "parameters": {"model": VOICE, "language": "en"}}
#: About 2.4 s of speech with the bundled voice.
SHORT_TEXT = "Hello world. This is a test of Chorus."


def body(text: str = SHORT_TEXT, config: dict = TTS1, **request: object) -> dict:
    return {"config": config, "request": {"model": config["name"], "text": text, **request}}


@pytest.fixture(scope="module")
def models(piper_models: Path) -> Path:
    return piper_models


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("configs")
    (folder / "a-tts-1.yaml").write_text(f"name: tts-1\nbackend: piper\nparameters:\n  model: {VOICE}\n")
    # A config whose voice file is absent: it must not keep the worker from serving tts-1.
    (folder / "b-broken.yaml").write_text("name: broken\nbackend: piper\nparameters:\n  model: absent.onnx\n")
    # Another backend's config: not this worker's business.
    (folder / "c-music.yaml").write_text("name: music\nbackend: transformers-musicgen\nparameters:\n  model: m\n")
    return folder


@pytest.fixture(scope="module")
def client(configs: Path, models: Path):
    with TestClient(create_app("piper", configs, models)) as running:
        wait_ready(running)
        yield running


def wait_ready(client: TestClient, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (response := client.get("/healthz")).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)
    return response


def test_healthz_reports_loaded_and_failed_models(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ready" and health["backend"] == "piper"
    assert health["models"] == ["tts-1"]
    assert list(health["failed"]) == ["broken"] and "absent.onnx" in health["failed"]["broken"]


def test_synthesize_streams_pcm_with_its_format_in_headers(client: TestClient) -> None:
    response = client.post("/synthesize", json=body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-sample-rate"] == "22050"
    assert response.headers["x-sample-format"] == "s16le"
    assert response.headers["x-channels"] == "1"
    pcm = np.frombuffer(response.content, dtype="<i2")
    assert len(response.content) % 2 == 0
    assert 1.8 <= len(pcm) / 22050 <= 4.0
    assert np.sqrt(np.mean((pcm / 32768.0) ** 2)) > 0.01


def test_request_fields_reach_the_backend(client: TestClient) -> None:
    normal = client.post("/synthesize", json=body()).content
    fast = client.post("/synthesize", json=body(speed=2.0)).content
    # Piper's durations vary a little from run to run; unchanged speed would be near 1.
    assert 0.35 < len(fast) / len(normal) < 0.75


def test_voices(client: TestClient) -> None:
    response = client.post("/voices", json={"config": TTS1})
    assert response.status_code == 200
    assert response.json() == {"voices": ["en_US-joe-medium"]}


def error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    payload = response.json()["error"]
    assert payload["code"] == code
    return payload


def test_unknown_voice_is_a_400_naming_the_field(client: TestClient) -> None:
    payload = error(client.post("/synthesize", json=body(voice="nobody")), 400, "invalid_request")
    assert payload["param"] == "voice" and "nobody" in payload["message"]


def test_malformed_requests_are_400(client: TestClient) -> None:
    payload = error(client.post("/synthesize", content=b"{not json"), 400, "invalid_request")
    assert "not valid JSON" in payload["message"]
    payload = error(client.post("/synthesize", json={"config": TTS1}), 400, "invalid_request")
    assert payload["param"] == "request"
    bad_speed = body(speed=0)
    payload = error(client.post("/synthesize", json=bad_speed), 400, "invalid_request")
    assert payload["param"] == "request.speed"


def test_missing_model_file_is_a_404_naming_it(client: TestClient) -> None:
    broken = {"name": "broken", "backend": "piper", "parameters": {"model": "absent.onnx"}}
    payload = error(client.post("/synthesize", json=body(config=broken)), 404, "model_not_found")
    assert "absent.onnx" in payload["message"]


def test_path_outside_models_dir_is_refused(client: TestClient) -> None:
    escape = {"name": "escape", "backend": "piper", "parameters": {"model": "../../etc/passwd"}}
    payload = error(client.post("/synthesize", json=body(config=escape)), 500, "synthesis_failed")
    assert "outside the models directory" in payload["message"]


def test_another_backends_request_is_a_503(client: TestClient) -> None:
    coqui = {"name": "xtts", "backend": "coqui", "parameters": {"model": "x"}}
    payload = error(client.post("/synthesize", json=body(config=coqui)), 503, "wrong_backend")
    assert "'piper'" in payload["message"] and "'coqui'" in payload["message"]


def test_backend_library_missing_is_a_503(
    configs: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(functions.BACKENDS, "bark", ("functions.not_installed_here", "Bark"))
    config = {"name": "suno", "backend": "bark", "parameters": {"model": "x"}}
    with TestClient(create_app("bark", configs, models)) as bark_client:
        wait_ready(bark_client)
        payload = error(bark_client.post("/synthesize", json=body(config=config)), 503, "backend_unavailable")
    assert "images/bark" in payload["message"]


def test_healthz_is_503_until_the_models_are_loaded(
    configs: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    original = PiperBackend.load

    def slow_load(self: PiperBackend) -> None:
        assert release.wait(30)
        original(self)

    monkeypatch.setattr(PiperBackend, "load", slow_load)
    with TestClient(create_app("piper", configs, models)) as loading:
        health = loading.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        error(loading.post("/synthesize", json=body()), 503, "loading")
        release.set()
        assert wait_ready(loading).json()["models"] == ["tts-1"]
        assert loading.post("/synthesize", json=body()).status_code == 200


def test_unknown_backend_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="CHORUS_BACKEND"):
        create_app("espeak", Path("configs"), Path("models"))


def test_client_disconnect_stops_synthesis(
    configs: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []
    closed = threading.Event()
    original = PiperBackend.synthesize

    def counting(self: PiperBackend, request):
        try:
            for chunk in original(self, request):
                made.append(len(chunk))
                yield chunk
        finally:
            closed.set()

    monkeypatch.setattr(PiperBackend, "synthesize", counting)
    with serving(create_app("piper", configs, models), ready_path="/healthz") as url:
        sentences = 40
        text = " ".join(f"This is sentence number {n} of a long text." for n in range(sentences))
        with httpx.stream("POST", f"{url}/synthesize", json=body(text), timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_raw())
        # The chunk being made when the client left may finish; nothing after it is made. Once
        # the generator is closed (its finally has run) it can make nothing more: no need to
        # watch it for a while.
        assert closed.wait(60), "the backend's generator was never closed"
        assert len(made) < sentences / 2, f"{len(made)} of {sentences} sentences were made"
