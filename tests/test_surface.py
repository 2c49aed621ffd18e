"""The rest of what a user can reach on a real `chorus serve`, end to end: every ElevenLabs
output_format code, LocalAI's "ogg" and case-blind format names, OpenAI's SSE in every format and
its speed limits, the query parameters and sound generation as a user without MusicGen meets
them, /metrics, the API docs and the playground's files."""

from __future__ import annotations

import base64

import httpx
import pytest
import yaml

from router.api.elevenlabs.schemas import output_formats
from tests._live import assert_family_error, live_app, piper_setup
from tests.audio import (
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

ELEVEN_SPEECH = "/v1/text-to-speech/en_US-joe-medium"
# What each ElevenLabs codec is sent as, how PyAV must be told to read it, and its codecs.
ELEVEN_CODECS = {
    "mp3": ("audio/mpeg", None, MP3),
    "pcm": ("audio/pcm", "pcm", {"pcm_s16le"}),
    "wav": ("audio/wav", None, {"pcm_s16le"}),
    "opus": ("audio/ogg", None, OPUS),
    "ulaw": ("audio/basic", "ulaw", {"pcm_mulaw"}),
    "alaw": ("audio/x-alaw-basic", "alaw", {"pcm_alaw"}),
}


# --- ElevenLabs: every output_format code it advertises ---------------------------------------


@pytest.mark.parametrize("code", output_formats())
@pytest.mark.parametrize("route", ["", "/stream"])
def test_every_elevenlabs_output_format_gives_the_asked_codec_and_rate(client, route, code):
    codec, rate, *kbps = code.split("_")
    rate = int(rate)
    content_type, raw, codecs = ELEVEN_CODECS[codec]
    response = client.post(f"{ELEVEN_SPEECH}{route}", params={"output_format": code}, json={"text": SHORT_TEXT})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    data = response.content
    audio = decode(data, raw=raw, rate=rate if raw else None)
    assert audio.codec in codecs
    assert audio.sample_rate == rate
    assert_speech(audio)
    if codec == "wav":
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    if raw:
        # Headerless: the byte count alone tells the client the length.
        width = 2 if raw == "pcm" else 1
        assert len(data) == pytest.approx(audio.duration * rate * width)
    if kbps:
        # Container overhead aside, the size follows the asked bit rate.
        measured = len(data) * 8 / 1000 / audio.duration
        assert 0.6 * int(kbps[0]) < measured < 1.4 * int(kbps[0]), f"{measured:.0f} kbit/s"


def test_elevenlabs_stream_with_every_body_field(client):
    body = {
        "text": SHORT_TEXT,
        "model_id": "tts-1",
        "language_code": "en",
        "seed": 4294967295,
        "voice_settings": {"stability": 0, "similarity_boost": 1, "style": 0.3, "use_speaker_boost": True, "speed": 0.7},
    }
    response = client.post(f"{ELEVEN_SPEECH}/stream", params={"output_format": "pcm_22050"}, json=body)
    assert response.status_code == 200, response.text
    # The slowest speed ElevenLabs allows stretches the speech past its usual length.
    assert pcm_seconds(response.content, 22050) > SHORT_SECONDS[0] / 0.7


@pytest.mark.parametrize(
    "params, field",
    [
        ({"optimize_streaming_latency": 5}, "optimize_streaming_latency"),
        ({"optimize_streaming_latency": "fast"}, "optimize_streaming_latency"),
        ({"enable_logging": "perhaps"}, "enable_logging"),
    ],
)
@pytest.mark.parametrize("route", ["", "/stream"])
def test_elevenlabs_bad_query_parameters(client, route, params, field):
    response = client.post(f"{ELEVEN_SPEECH}{route}", params=params, json={"text": "hi"})
    assert field in assert_family_error(response, 422, family="elevenlabs")["message"]


def test_elevenlabs_unknown_voice_on_the_stream_route(client):
    response = client.post("/v1/text-to-speech/no-such-voice/stream", json={"text": "hi"})
    assert_family_error(response, 404, family="elevenlabs", code="voice_not_found")


def test_elevenlabs_models_shape_for_its_sdk_user_agent(client):
    # The SDK names itself in User-Agent even when no key is sent.
    body = client.get("/v1/models", headers={"user-agent": "elevenlabs-python/1.0"}).json()
    assert isinstance(body, list)
    assert any(model["model_id"] == "tts-1" and model["can_do_text_to_speech"] for model in body)


# --- Sound generation where no MusicGen backend is installed ---------------------------------


def test_sound_generation_with_a_speech_model_is_refused(client):
    response = client.post("/v1/sound-generation", json={"text": "rain", "model_id": "tts-1"})
    assert "speech model" in assert_family_error(response, 400, family="elevenlabs")["message"]


def test_sound_generation_without_its_backend_says_where_to_run_it(client):
    # configs/ has a MusicGen model; this environment lacks its backend.
    response = client.post("/v1/sound-generation", json={"text": "rain", "duration_seconds": 1})
    detail = assert_family_error(response, 503, family="elevenlabs")
    assert detail["status"] == "backend_unavailable"
    assert "transformers-musicgen" in detail["message"]


# --- LocalAI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, content_type, codecs, rate",
    [
        ("ogg", "audio/ogg", OPUS, 48000),
        ("OGG", "audio/ogg", OPUS, 48000),
        ("Mp3", "audio/mpeg", MP3, PIPER_RATE),
        ("FLAC", "audio/flac", {"flac"}, PIPER_RATE),
    ],
)
def test_localai_ogg_and_format_names_in_any_case(client, fmt, content_type, codecs, rate):
    response = client.post("/tts", json={"model": "tts-1", "input": SHORT_TEXT, "response_format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    audio = decode(response.content)
    assert audio.codec in codecs and audio.sample_rate == rate
    assert_speech(audio)


def test_localai_backend_alone_picks_its_default_model(client):
    response = client.post("/tts", json={"backend": "piper", "input": SHORT_TEXT})
    assert response.status_code == 200, response.text
    assert_speech(decode(response.content))


# --- OpenAI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, codecs, rate",
    [("wav", {"pcm_s16le"}, PIPER_RATE), ("flac", {"flac"}, PIPER_RATE), ("opus", OPUS, 48000), ("aac", {"aac"}, PIPER_RATE)],
)
def test_openai_sse_deltas_join_into_the_asked_format(client, fmt, codecs, rate):
    response = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "voice": {"id": "alloy"}, "input": SHORT_TEXT, "response_format": fmt, "stream_format": "sse"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.content)
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    decoded = decode(audio, raw="aac" if fmt == "aac" else None)
    assert decoded.codec in codecs and decoded.sample_rate == rate
    assert_speech(decoded)


def test_openai_speed_limits_are_inclusive(client):
    def seconds(speed: float) -> float:
        response = client.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT, "response_format": "pcm", "speed": speed},
        )
        assert response.status_code == 200, response.text
        return pcm_seconds(response.content)

    normal = seconds(1.0)
    assert seconds(4.0) < 0.5 * normal
    assert seconds(0.25) > 2 * normal


# --- System: metrics, API docs, playground ------------------------------------------------------


def test_metrics_count_the_session_servers_requests(client):
    def tts_requests() -> float:
        response = client.get("/metrics")
        assert response.status_code == 200
        # Prometheus' text exposition format (its version follows prometheus_client).
        assert response.headers["content-type"].startswith("text/plain; version=")
        lines = [
            line for line in response.text.splitlines()
            if line.startswith("chorus_requests_total{") and 'route="/tts"' in line and 'status="200"' in line
        ]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = tts_requests()
    assert client.post("/tts", json={"input": "Counted."}).status_code == 200
    assert tts_requests() == before + 1


def test_openapi_documents_every_public_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path, method in [
        ("/tts", "post"),
        ("/v1/audio/speech", "post"),
        ("/v1/models", "get"),
        ("/v1/audio/voices", "get"),
        ("/v1/audio/models", "get"),
        ("/v1/text-to-speech/{voice_id}", "post"),
        ("/v1/text-to-speech/{voice_id}/stream", "post"),
        ("/v1/voices", "get"),
        ("/v2/voices", "get"),
        ("/v1/sound-generation", "post"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ]:
        assert method in paths.get(path, {}), path
    speech = paths["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert speech["$ref"].endswith("SpeechBody")


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_interactive_docs_point_at_the_schema(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


@pytest.mark.parametrize(
    "path, content_type, marker",
    [
        ("/", "text/html", "playground.js"),
        ("/playground", "text/html", "playground.js"),
        ("/playground/static/playground.html", "text/html", "playground.css"),
        ("/playground/static/playground.js", "text/javascript", "/v1/audio/speech"),
        ("/playground/static/playground.css", "text/css", "{"),
    ],
)
def test_playground_files(client, path, content_type, marker):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert marker in response.text


def test_unknown_playground_file_is_a_json_404(client):
    response = client.get("/playground/static/missing.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# --- ElevenLabs: voice ids with a slash --------------------------------------------------------


@pytest.fixture(scope="module")
def slashed(tmp_path_factory: pytest.TempPathFactory):
    configs, models = piper_setup(tmp_path_factory.mktemp("slashed"))
    # Bark presets (v2/en_speaker_6) and clone references (voices/ref.wav) are listed like this.
    config = yaml.safe_load((configs / "tts-1.yaml").read_text())
    config["voices"] = {"team/narrator": "en_US-joe-medium"}
    (configs / "tts-1.yaml").write_text(yaml.safe_dump(config))
    with live_app(configs, models) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("voice", ["team/narrator", "team%2Fnarrator"])
@pytest.mark.parametrize("route", ["", "/stream"])
def test_a_listed_voice_id_with_a_slash_speaks(slashed, voice, route):
    listed = [v["voice_id"] for v in slashed.get("/v1/voices").json()["voices"]]
    assert "team/narrator" in listed
    response = slashed.post(f"/v1/text-to-speech/{voice}{route}", params={"output_format": "wav_22050"},
                            json={"text": SHORT_TEXT})
    assert response.status_code == 200, response.text
    assert_speech(decode(response.content))


def test_an_unknown_voice_id_with_a_slash_is_voice_not_found(slashed):
    response = slashed.post("/v1/text-to-speech/team/nobody/stream", json={"text": "hi"})
    detail = assert_family_error(response, 404, family="elevenlabs", code="voice_not_found")
    assert "team/nobody" in detail["message"]
