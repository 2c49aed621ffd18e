"""Every error a client can meet, with its status and its family's shape, against real servers:
the session's, one whose configs include a corrupt model, and one whose runner fails mid-stream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator

import httpx
import pytest

from tests._live import assert_family_error
from tests.audio import SHORT_TEXT, assert_speech, decode, parse_sse
from tests.processes import CONFIGS, chorus_command, chorus_server, free_port, serving

OPENAI_SPEECH = "/v1/audio/speech"
ELEVEN_SPEECH = "/v1/text-to-speech/en_US-joe-medium"


def openai_speech(client, **body):
    return client.post(OPENAI_SPEECH, json={"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT, **body})


# --- OpenAI ----------------------------------------------------------------------------------


def test_openai_unknown_model(client):
    error = assert_family_error(
        openai_speech(client, model="no-such-model"), 404, family="openai", param="model", code="model_not_found"
    )
    assert "no-such-model" in error["message"] and "tts-1" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": "   \n "}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"speed": 0.2}, "speed"),
        ({"speed": 4.5}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
        ({"response_format": "ulaw"}, "response_format"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"voice": "no-such-voice"}, "voice"),
        ({"input": None}, "input"),
    ],
)
def test_openai_bad_requests(client, body, param):
    error = assert_family_error(openai_speech(client, **body), 400, family="openai", param=param)
    assert param in error["message"]


@pytest.mark.parametrize("path, field, extra", [
    (OPENAI_SPEECH, "input", {"model": "tts-1", "voice": "alloy"}),
    ("/tts", "input", {}),
    (ELEVEN_SPEECH, "text", {}),
], ids=["openai", "localai", "elevenlabs"])
def test_a_lone_surrogate_is_the_clients_bad_text(client, path, field, extra):
    """JSON can carry half a UTF-16 surrogate pair (`\\ud800`); it is no character: a 400 naming
    the field, not a backend's failure."""
    body = json.dumps({field: "HALF broken", **extra}).replace("HALF", "\\ud800")
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_family_error(response, 400, code="invalid_request")
    assert "surrogate" in error["message"] and field in error["message"]
    assert openai_speech(client).status_code == 200  # and the server goes on


def test_openai_voice_object_without_id(client):
    response = openai_speech(client, voice={"name": "alloy"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "voice"


def test_openai_input_limit_is_inclusive(client):
    # 4096 characters is allowed; mostly spaces keeps the synthesis short.
    text = "Hi there." + " " * 4087
    assert len(text) == 4096
    response = openai_speech(client, input=text, response_format="wav")
    assert response.status_code == 200, response.text
    assert decode(response.content).duration > 0.3


def test_control_characters_are_not_spoken(client):
    # A NUL used to reach espeak, which stops at it and failed the request with a 500.
    response = openai_speech(client, input="Hello\x00 there.\x07", response_format="wav")
    assert response.status_code == 200, response.text
    assert 0.4 < decode(response.content).duration < 2.0
    assert_family_error(openai_speech(client, input="\x00\x01\x1f"), 400, family="openai", param="input")


def test_openai_missing_fields(client):
    assert_family_error(
        client.post(OPENAI_SPEECH, json={"model": "tts-1", "voice": "alloy"}), 400, family="openai", param="input"
    )
    assert_family_error(
        client.post(OPENAI_SPEECH, json={"model": "tts-1", "input": "hi"}), 400, family="openai", param="voice"
    )


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_openai_malformed_body(client, content):
    response = client.post(OPENAI_SPEECH, content=content, headers={"content-type": "application/json"})
    assert_family_error(response, 400, family="openai", param=None)


def test_openai_unknown_path_and_method(client):
    assert_family_error(client.get("/v1/no-such-route"), 404, family="openai", param=None, code="not_found")
    assert_family_error(client.post("/v1/audio/transcriptions-nope", json={}), 404, family="openai", param=None)
    assert_family_error(client.get(OPENAI_SPEECH), 405, family="openai", param=None)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "pcm"])
def test_punctuation_alone_is_a_400_in_every_format(client, fmt):
    # Piper makes no sound of it: the text is at fault, and a header alone must not pass as a 200.
    error = assert_family_error(
        openai_speech(client, input="... ?!", response_format=fmt), 400, family="openai", param="input", code="invalid_request"
    )
    assert "nothing" in error["message"] and "no letters or digits" in error["message"]


def test_a_symbol_the_voice_can_name_is_spoken(client):
    # Why punctuation is refused only after synthesis: espeak names many symbols.
    response = openai_speech(client, input="\u2603", response_format="wav")
    assert response.status_code == 200, response.text
    assert decode(response.content).duration > 0.3


# --- LocalAI ---------------------------------------------------------------------------------


def test_localai_unknown_model(client):
    error = assert_family_error(
        client.post("/tts", json={"model": "no-such-model", "input": "hi"}), 404, family="localai", code="model_not_found"
    )
    assert "no-such-model" in error["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input": ""}, "input"),
        ({"input": "— ... —"}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"model": "tts-1"}, "input"),
        ({"input": "hi", "backend": "no-such-backend"}, "backend"),
        ({"input": "hi", "voice": "no-such-voice"}, "voice"),
    ],
)
def test_localai_bad_requests(client, body, field):
    error = assert_family_error(client.post("/tts", json=body), 400, family="localai")
    assert field in error["message"]


def test_localai_backend_not_installed(client):
    # Every backend but Piper lives in its own image; naming one here says where to run it.
    error = assert_family_error(
        client.post("/tts", json={"model": "tts-1", "backend": "coqui", "input": "hi"}),
        503,
        family="localai",
        code="backend_unavailable",
    )
    assert "images/coqui" in error["message"]


def test_localai_malformed_json_and_unknown_path(client):
    assert_family_error(
        client.post("/tts", content=b"{oops", headers={"content-type": "application/json"}), 400, family="localai"
    )
    assert_family_error(client.post("/tts/extra", json={"input": "hi"}), 404, family="localai", code="not_found")
    assert_family_error(client.get("/tts"), 405, family="localai")


# --- ElevenLabs ------------------------------------------------------------------------------


def test_elevenlabs_unknown_model(client):
    response = client.post(ELEVEN_SPEECH, json={"text": "hi", "model_id": "no-such-model"})
    assert "no-such-model" in assert_family_error(response, 404, family="elevenlabs", code="model_not_found")["message"]


@pytest.mark.parametrize("speed", [0.6, 1.3])
def test_elevenlabs_speed_range(client, speed):
    response = client.post(ELEVEN_SPEECH, json={"text": "hi", "voice_settings": {"speed": speed}})
    assert "voice_settings.speed" in assert_family_error(response, 422, family="elevenlabs")["message"]


@pytest.mark.parametrize("code", ["mp3_44100_999", "flac_44100", "pcm", "opus_24000_64", "ulaw_16000", "mp3"])
def test_elevenlabs_bad_output_format(client, code):
    response = client.post(ELEVEN_SPEECH, params={"output_format": code}, json={"text": "hi"})
    assert "output_format" in assert_family_error(response, 400, family="elevenlabs", code="invalid_request")["message"]


@pytest.mark.parametrize(
    "body, field, status",
    [
        ({"text": ""}, "text", 400),
        ({"text": "..."}, "text", 400),
        ({"text": "x" * 4097}, "text", 400),
        ({}, "text", 422),
        ({"text": "hi", "seed": -1}, "seed", 422),
        ({"text": "hi", "voice_settings": {"stability": 2}}, "voice_settings.stability", 422),
    ],
)
def test_elevenlabs_bad_requests(client, body, field, status):
    assert field in assert_family_error(client.post(ELEVEN_SPEECH, json=body), status, family="elevenlabs")["message"]


def test_elevenlabs_unknown_voice_is_voice_not_found(client):
    response = client.post("/v1/text-to-speech/no-such-voice", json={"text": "hi"})
    detail = assert_family_error(response, 404, family="elevenlabs", code="voice_not_found")
    # ElevenLabs' own wording, then the voices this server does have.
    assert "A voice with the voice_id no-such-voice was not found" in detail["message"]
    assert "en_US-joe-medium" in detail["message"]


def test_wrong_method_is_method_not_allowed_in_each_family(client):
    assert_family_error(
        client.get("/v1/text-to-speech/en_US-joe-medium"), 405, family="elevenlabs", code="method_not_allowed"
    )
    assert client.get("/v1/audio/speech").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/tts").json()["error"]["type"] == "method_not_allowed"


def test_empty_body_says_the_body_is_missing(client):
    response = client.post("/v1/audio/speech")
    assert response.status_code == 400
    assert "body is missing" in response.json()["error"]["message"]


def test_elevenlabs_malformed_json_and_unknown_path(client):
    assert_family_error(
        client.post(ELEVEN_SPEECH, content=b"{oops", headers={"content-type": "application/json"}),
        422,
        family="elevenlabs",
    )
    assert_family_error(client.get("/v1/voices/no-such-voice/settings"), 404, family="elevenlabs", code="not_found")
    assert_family_error(client.post("/v1/text-to-speech", json={"text": "hi"}), 404, family="elevenlabs")


# --- Paths that would leave the models directory ---------------------------------------------


@pytest.fixture
def escape_routes(server, voice_files, tmp_path):
    """Working voices reachable only by leaving the models directory: through `..` (a sibling of
    the models dir), an absolute path, and a symlink inside the models dir. Were any followed, the
    request would succeed with real audio; refusing them is the only way to get an error."""
    onnx, json_file = voice_files
    sibling = server.models_dir.parent / "outside-voice.onnx"
    links = [
        (sibling, onnx),
        (sibling.with_name(sibling.name + ".json"), json_file),
        (server.models_dir / "escape.onnx", onnx),
        (server.models_dir / "escape.onnx.json", json_file),
    ]
    for link, target in links:
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    yield {
        "dotdot": "../outside-voice.onnx",
        "absolute": str(onnx),
        "symlink": "escape.onnx",
    }
    for link, _ in links:
        link.unlink(missing_ok=True)


@pytest.mark.parametrize("route", ["dotdot", "absolute", "symlink"])
def test_model_paths_outside_the_models_dir_are_refused(client, escape_routes, route):
    name = escape_routes[route]
    response = client.post("/tts", json={"model": name, "backend": "piper", "input": "hi"})
    error = assert_family_error(response, 400, family="localai", code="invalid_request")
    assert "models directory" in error["message"]


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..%2f..%2fetc%2fpasswd", "sub/../../etc/passwd", "..\\..\\etc\\passwd"]
)
def test_hostile_model_names_never_reach_a_file(client, name):
    response = client.post("/tts", json={"model": name, "backend": "piper", "input": "hi"})
    # Refused as unsafe, or (the percent-encoded one, a literal name inside) simply not found.
    assert response.status_code in (400, 404), response.text
    assert "root:" not in response.text


def test_voice_id_in_the_path_cannot_traverse(client):
    response = client.post("/v1/text-to-speech/..%2F..%2Fetc%2Fpasswd", json={"text": "hi"})
    assert response.status_code in (400, 404)
    assert list(response.json()) == ["detail"]


# --- Configs refused at start-up -------------------------------------------------------------


def refused_at_start(tmp_path, files: dict[str, str]) -> str:
    """Run `chorus serve` on a configs dir holding `files`; it must exit at once, not serve."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, text in files.items():
        (configs / name).write_text(text)
    models = tmp_path / "models"
    models.mkdir()
    result = subprocess.run(
        chorus_command("serve", "--configs", str(configs), "--models", str(models)),
        env={**os.environ, "HOST": "127.0.0.1", "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "field, yaml",
    [
        ("parameters.model", "parameters:\n  model: ../x.onnx\n"),
        ("parameters.model", "parameters:\n  model: /etc/passwd\n"),
        ("tts.vall-e.audio_path", "tts:\n  vall-e:\n    audio_path: ../../secret.wav\n"),
    ],
)
def test_config_paths_outside_the_models_dir_refused_at_start(tmp_path, field, yaml):
    stderr = refused_at_start(tmp_path, {"evil.yaml": f"name: evil-model\nbackend: piper\n{yaml}"})
    assert "evil.yaml" in stderr
    assert f"field '{field}'" in stderr
    assert "outside the models directory" in stderr


def test_invalid_config_refused_at_start(tmp_path):
    stderr = refused_at_start(tmp_path, {"bad.yaml": "name: bad\nbackend: espeak\n"})
    assert "bad.yaml" in stderr and "field 'backend'" in stderr


def test_duplicate_config_names_refused_at_start(tmp_path):
    stderr = refused_at_start(
        tmp_path, {"a.yaml": "name: same\nbackend: piper\n", "b.yaml": "name: same\nbackend: piper\n"}
    )
    assert "a.yaml" in stderr and "b.yaml" in stderr and "'same'" in stderr


# --- A backend that fails to load ------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory, voice_files):
    """tts-1 plus a model whose .onnx is corrupt. Its config sorts first, so it is also the
    default model and is preloaded before tts-1."""
    root = tmp_path_factory.mktemp("broken")
    configs, models = root / "configs", root / "models"
    configs.mkdir()
    models.mkdir()
    shutil.copyfile(CONFIGS / "tts-1.yaml", configs / "tts-1.yaml")
    (configs / "a-broken.yaml").write_text("name: broken\nbackend: piper\nparameters:\n  model: corrupt.onnx\n")
    (models / "corrupt.onnx").write_bytes(b"\x08\x07this is not an onnx graph" * 100)
    shutil.copyfile(voice_files[1], models / "corrupt.onnx.json")
    with chorus_server(models, root / "server.log", configs, timeout=60) as running:
        yield running


def test_corrupt_model_gives_a_clear_500_and_the_server_keeps_serving(broken_server):
    with httpx.Client(base_url=broken_server.url, timeout=60) as client:
        error = assert_family_error(
            openai_speech(client, model="broken"), 500, family="openai", param=None, code="synthesis_failed"
        )
        assert "broken" in error["message"]
        error = assert_family_error(client.post("/tts", json={"input": "hi"}), 500, family="localai", code="synthesis_failed")
        assert "broken" in error["message"]
        response = client.post(ELEVEN_SPEECH, json={"text": "hi", "model_id": "broken"})
        assert "broken" in assert_family_error(response, 500, family="elevenlabs", code="synthesis_failed")["message"]

        response = openai_speech(client, response_format="wav")
        assert response.status_code == 200, response.text
        assert_speech(decode(response.content))
        # Listings still answer, with what the working model offers.
        assert "en_US-joe-medium" in [v["id"] for v in client.get("/v1/audio/voices").json()["voices"]]
        assert client.get("/v1/voices").status_code == 200
        assert client.get("/readyz").status_code == 200


# --- A backend that fails mid-stream ---------------------------------------------------------


@pytest.fixture(scope="module")
def failing_app_url(server):
    """The real app in this process, served by uvicorn on loopback, whose runner raises after the
    first PCM chunk of every request: the failure comes after the 200 has been sent."""
    from router.app import create_app
    from router.errors import SynthesisFailed
    from router.runners import PcmStream, Runner
    from router.runners.local import InProcessRunner
    from router.settings import Settings

    class FailAfterFirstChunk(Runner):
        def __init__(self, inner: Runner):
            self.inner = inner

        async def start(self, preload):
            await self.inner.start(preload)

        def is_ready(self) -> bool:
            return self.inner.is_ready()

        async def voices(self, config):
            return await self.inner.voices(config)

        async def close(self):
            await self.inner.close()

        async def stream(self, config, request) -> PcmStream:
            pcm = await self.inner.stream(config, request)

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in pcm.audio:
                        yield chunk
                        raise SynthesisFailed("backend 'piper' failed: the worker died")
                finally:
                    await pcm.audio.aclose()

            return PcmStream(pcm.sample_rate, chunks())

    settings = Settings(configs_dir=CONFIGS, models_dir=server.models_dir)
    app = create_app(settings, runner=FailAfterFirstChunk(InProcessRunner(server.models_dir)))
    with serving(app, log_level="critical") as url:
        yield url


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
def test_mid_stream_failure_leaves_raw_audio_visibly_incomplete(failing_app_url, fmt):
    body = {"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT, "response_format": fmt}
    received = 0
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{failing_app_url}{OPENAI_SPEECH}", json=body, timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += len(chunk)
    assert received > 0, "the failure should come after audio has started to flow"
    # The server survives the failure.
    assert httpx.get(f"{failing_app_url}/healthz", timeout=5).status_code == 200


def test_mid_stream_failure_ends_sse_with_an_error_event(failing_app_url):
    body = {"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT, "response_format": "mp3", "stream_format": "sse"}
    response = httpx.post(f"{failing_app_url}{OPENAI_SPEECH}", json=body, timeout=60)
    assert response.status_code == 200
    events = parse_sse(response.content)
    types = [event["type"] for event in events]
    assert types[-1] == "error" and "speech.audio.done" not in types
    assert "the worker died" in events[-1]["error"]["message"]
    assert events[-1]["error"]["code"] == "synthesis_failed"
