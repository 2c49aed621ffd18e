"""The official OpenAI and ElevenLabs SDKs, unchanged, pointed at a real Chorus server: what
users of either API actually run, including how errors surface through each SDK."""

from __future__ import annotations

import base64

import pytest

from tests.audio import SHORT_TEXT, assert_speech, decode, parse_sse, pcm_seconds

openai = pytest.importorskip("openai")
elevenlabs = pytest.importorskip("elevenlabs")

VOICE = "en_US-joe-medium"


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def xi(server):
    from elevenlabs.client import ElevenLabs

    return ElevenLabs(base_url=server.url, api_key="x", timeout=120)


# --- OpenAI ----------------------------------------------------------------------------------


def test_openai_create(oai):
    response = oai.audio.speech.create(model="tts-1", voice="alloy", input=SHORT_TEXT)
    assert response.response.headers["content-type"] == "audio/mpeg"
    audio = decode(response.content)
    assert audio.codec in ("mp3", "mp3float")
    assert_speech(audio)


def test_openai_streaming_response(oai):
    with oai.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input=SHORT_TEXT, response_format="pcm", speed=1.5, instructions="Calmly."
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        parts = list(response.iter_bytes())
    data = b"".join(parts)
    # Speed 1.5 on the SDK's side still reaches the voice.
    assert 0.9 < pcm_seconds(data) < 3.0
    assert_speech(decode(data, raw="pcm", rate=24000), (0.9, 3.0))


def test_openai_sse_through_the_sdk(oai):
    with oai.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SHORT_TEXT, response_format="wav", stream_format="sse"
    ) as response:
        events = parse_sse(response.read())
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert_speech(decode(audio))


def test_openai_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.audio.speech.create(model="no-such-model", voice="alloy", input=SHORT_TEXT)
    error = caught.value
    assert error.status_code == 404
    assert error.param == "model"
    assert error.code == "model_not_found"
    assert "no-such-model" in error.message


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"speed": 5.0}, "speed"),
        ({"input": ""}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"voice": "no-such-voice"}, "voice"),
    ],
)
def test_openai_bad_requests(oai, kwargs, param):
    args = {"model": "tts-1", "voice": "alloy", "input": SHORT_TEXT, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.audio.speech.create(**args)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_openai_models_list(oai):
    assert "tts-1" in [model.id for model in oai.models.list()]


@pytest.mark.parametrize("model", ["gpt-4o-mini-tts", "tts-1-hd"])
def test_the_model_names_other_openai_clients_send_reach_the_default_voice(oai, model):
    """LiveKit's OpenAI plugin sends gpt-4o-mini-tts and reads 24 kHz PCM; the default config
    lists OpenAI's model names as its aliases."""
    assert model in [listed.id for listed in oai.models.list()]
    with oai.audio.speech.with_streaming_response.create(
        model=model, voice="coral", input=SHORT_TEXT, response_format="pcm"
    ) as response:
        data = response.read()
    assert_speech(decode(data, raw="pcm", rate=24000))


# --- ElevenLabs ------------------------------------------------------------------------------


def test_elevenlabs_convert(xi):
    data = b"".join(xi.text_to_speech.convert(voice_id=VOICE, text=SHORT_TEXT))
    audio = decode(data)
    assert audio.codec in ("mp3", "mp3float") and audio.sample_rate == 44100
    assert_speech(audio)


def test_elevenlabs_convert_with_settings(xi):
    from elevenlabs import VoiceSettings

    data = b"".join(
        xi.text_to_speech.convert(
            voice_id=VOICE,
            text=SHORT_TEXT,
            model_id="tts-1",
            output_format="wav_24000",
            language_code="en",
            seed=7,
            voice_settings=VoiceSettings(stability=0.5, similarity_boost=0.7, speed=1.2),
        )
    )
    audio = decode(data)
    assert (audio.codec, audio.sample_rate) == ("pcm_s16le", 24000)
    assert_speech(audio, (1.2, 3.6))


def test_elevenlabs_stream(xi):
    chunks = list(xi.text_to_speech.stream(voice_id=VOICE, text=SHORT_TEXT, output_format="pcm_16000"))
    data = b"".join(chunks)
    assert_speech(decode(data, raw="pcm", rate=16000))


def test_elevenlabs_voices_and_models(xi):
    voices = xi.voices.get_all().voices
    assert VOICE in [voice.voice_id for voice in voices]
    models = xi.models.list()
    tts1 = next(model for model in models if model.model_id == "tts-1")
    assert tts1.can_do_text_to_speech is True


def test_elevenlabs_unknown_model(xi):
    from elevenlabs.core import ApiError

    with pytest.raises(ApiError) as caught:
        b"".join(xi.text_to_speech.convert(voice_id=VOICE, text=SHORT_TEXT, model_id="no-such-model"))
    assert caught.value.status_code == 404
    assert caught.value.body["detail"]["status"] == "model_not_found"
    assert "no-such-model" in caught.value.body["detail"]["message"]


def test_elevenlabs_out_of_range_speed(xi):
    from elevenlabs import VoiceSettings
    from elevenlabs.core import ApiError

    with pytest.raises(ApiError) as caught:
        b"".join(
            xi.text_to_speech.convert(voice_id=VOICE, text=SHORT_TEXT, voice_settings=VoiceSettings(speed=2.0))
        )
    assert caught.value.status_code == 422
    assert "voice_settings.speed" in caught.value.body["detail"]["message"]
