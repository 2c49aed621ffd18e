"""Settings as an operator gives them, through the environment of `chorus serve`, end to end: the
body limit (413 in each API family's shape, by Content-Length or while a chunked body arrives),
input limits per route, the response cache; and a bad value stops the server with a message
that names its variable."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.piper import install_bundled_voice
from tests._live import assert_family_error
from tests.audio import decode
from tests.processes import chorus_command, chorus_server

BODY_LIMIT = 2048
#: One request per API family, with a field long enough to pass the body limit.
FAMILIES = [
    ("/v1/audio/speech", "input", {"model": "tts-1", "voice": "alloy"}),
    ("/tts", "input", {}),
    ("/v1/text-to-speech/en_US-joe-medium", "text", {}),
    ("/v1/sound-generation", "text", {}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("settings-env")
    install_bundled_voice(root / "models")
    env = {
        "CHORUS_MAX_BODY_BYTES": str(BODY_LIMIT),
        "CHORUS_MAX_INPUT_CHARS": "60",
        "CHORUS_MAX_INPUT_CHARS_BY_ROUTE": "localai=200, elevenlabs=120",
        "CHORUS_CACHE_DIR": str(root / "cache"),
        "CHORUS_CACHE_MAX_MB": "5",
    }
    with chorus_server(root / "models", root / "server.log", env=env) as running:
        yield running.url


@pytest.mark.parametrize(("path", "field", "body"), FAMILIES, ids=["openai", "localai", "elevenlabs", "sound"])
def test_a_body_over_the_limit_is_413_in_the_family_shape(server, path, field, body):
    too_big = {**body, field: "x" * (BODY_LIMIT + 100)}
    response = httpx.post(f"{server}{path}", json=too_big, timeout=30)
    error = assert_family_error(response, 413)
    assert str(BODY_LIMIT) in error["message"]


@pytest.mark.parametrize(("path", "field", "body"), FAMILIES, ids=["openai", "localai", "elevenlabs", "sound"])
def test_a_chunked_body_over_the_limit_is_413_too(server, path, field, body):
    import json

    data = json.dumps({**body, field: "x" * (BODY_LIMIT + 100)}).encode()

    def pieces() -> Iterator[bytes]:  # no Content-Length: the limit must hold as it arrives
        for start in range(0, len(data), 512):
            yield data[start:start + 512]

    response = httpx.post(f"{server}{path}", content=pieces(), headers={"content-type": "application/json"}, timeout=30)
    assert_family_error(response, 413)


#: Far more than a socket's buffers hold: the client is still writing when the server answers.
LARGE_BODY = 4_000_000


@pytest.mark.anyio
async def test_an_async_client_writing_a_large_body_reads_the_413(server):
    """httpx's and openai's async clients (LiveKit's OpenAI plugin) write the whole body before
    they read: a server that answers and closes mid-body gives them a connection reset, not the
    413, unless it reads the rest first."""
    import openai

    too_big = {"model": "tts-1", "voice": "alloy", "input": "x" * LARGE_BODY}
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        for _ in range(5):
            assert_family_error(await client.post("/v1/audio/speech", json=too_big), 413)
    sdk = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.audio.speech.create(**too_big)
        assert refused.value.status_code == 413
    await sdk.close()
    # Nothing of it stays: the server serves the next request.
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        response = await client.post("/v1/audio/speech", json={**too_big, "input": "Still here.", "response_format": "wav"})
    assert response.status_code == 200 and decode(response.content).duration > 0.3


def test_a_content_length_that_is_not_a_number_is_refused(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: lots\r\nConnection: close\r\n\r\n{}")
        reply = sock.recv(4096)
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), reply[:80]


def test_a_body_under_the_limit_is_served(server):
    response = httpx.post(f"{server}/v1/audio/speech", timeout=60, json={
        "model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "wav"})
    assert response.status_code == 200, response.text
    assert decode(response.content).duration > 0.3


def test_input_limits_per_route(server):
    text = "A sentence long enough to pass sixty characters, and then a few more."  # 70
    assert 60 < len(text) <= 120
    openai = httpx.post(f"{server}/v1/audio/speech", timeout=60,
                        json={"model": "tts-1", "voice": "alloy", "input": text})
    assert "the limit is 60" in assert_family_error(openai, 400)["message"]
    for path, field in (("/tts", "input"), ("/v1/text-to-speech/en_US-joe-medium", "text")):
        response = httpx.post(f"{server}{path}", json={field: text}, timeout=60)
        assert response.status_code == 200, response.text
        assert decode(response.content).duration > 2.0
    longer = text * 2  # 140: under localai's 200, over elevenlabs' 120
    assert httpx.post(f"{server}/tts", json={"input": longer}, timeout=60).status_code == 200
    eleven = httpx.post(f"{server}/v1/text-to-speech/en_US-joe-medium", json={"text": longer}, timeout=60)
    assert "the limit is 120" in assert_family_error(eleven, 400)["message"]


def test_the_cache_set_by_the_environment_answers_the_second_time(server):
    body = {"model": "tts-1", "voice": "alloy", "input": "Cached once.", "response_format": "wav"}
    first = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=60)
    second = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=60)
    assert (first.headers["x-chorus-cache"], second.headers["x-chorus-cache"]) == ("miss", "hit")
    assert second.content == first.content


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CHORUS_MAX_INPUT_CHARS_BY_ROUTE", "localia=10", "CHORUS_MAX_INPUT_CHARS_BY_ROUTE: Input should be 'openai'"),
        ("CHORUS_MAX_QUEUE", "lots", "CHORUS_MAX_QUEUE: Input should be a valid integer"),
        ("CHORUS_MODE", "cloud", "CHORUS_MODE: Input should be 'local', 'http', 'docker' or 'modal'"),
        ("CHORUS_BACKEND_URLS", "piper", "CHORUS_BACKEND_URLS: 'piper' is not name=value"),
        ("CHORUS_MAX_INPUT_CHARS_BY_ROUTE", "openai=80, =5", "CHORUS_MAX_INPUT_CHARS_BY_ROUTE: '=5' is not name=value"),
    ],
)
def test_a_bad_setting_stops_the_server_naming_its_variable(tmp_path, variable, value, expected):
    env = {**os.environ, variable: value, "PORT": "0"}
    result = subprocess.run(chorus_command("serve", "--models", str(tmp_path)), env=env,
                            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
