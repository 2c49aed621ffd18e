"""ElevenLabs' POST /v1/sound-generation through the router, the way compose wires it: `chorus
serve` in http mode in the router's environment, and the MusicGen worker in an environment built
from images/transformers-musicgen, serving a tiny model on loopback."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from elevenlabs import ElevenLabs

from tests.audio import audio_seconds, decode
from tests.processes import chorus_server
from tests.tiny_models.harness import offline_env, tiny_worker

pytestmark = pytest.mark.images

RATE = 32000
PROMPT = "Rain on a tin roof. Distant thunder. A dog barks twice."


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sound")
    # The default speech model first, as in configs/: sound generation must find its own.
    speech = {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"}}
    sound = {"name": "tiny-sound", "backend": "transformers-musicgen", "parameters": {"model": "tiny-musicgen"}}
    with tiny_worker(root, "transformers-musicgen", "musicgen", speech, sound) as url:
        env = offline_env(CHORUS_MODE="http", CHORUS_BACKEND_URLS=f"transformers-musicgen={url}")
        with chorus_server(root / "models", root / "router.log", root / "configs", env=env) as server:
            yield server.url


def generate(url: str, output_format: str | None = "pcm_32000", **body: object) -> httpx.Response:
    params = {"output_format": output_format} if output_format else {}
    return httpx.post(f"{url}/v1/sound-generation", params=params, json={"text": PROMPT, **body}, timeout=300)


def seconds(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return len(np.frombuffer(response.content, dtype="<i2")) / RATE


def test_duration_seconds_sets_the_length_and_the_prompt_is_not_split(router: str) -> None:
    # Split into its three sentences, the prompt would come back three times as long.
    assert seconds(generate(router, duration_seconds=0.5)) == pytest.approx(0.5, abs=0.021)
    assert seconds(generate(router, duration_seconds=1.5)) == pytest.approx(1.5, abs=0.021)


def test_without_a_duration_it_is_localai_s_five_seconds(router: str) -> None:
    assert seconds(generate(router)) == pytest.approx(5.0, abs=0.021)


def test_default_output_is_mp3_that_decodes(router: str) -> None:
    response = generate(router, output_format=None, duration_seconds=0.5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert audio_seconds(response.content) == pytest.approx(0.5, abs=0.1)


def test_prompt_influence_and_do_sample_reach_the_model(router: str) -> None:
    def clip(**fields: object) -> bytes:
        response = generate(router, duration_seconds=0.5, **fields)
        assert response.status_code == 200, response.text
        return response.content

    greedy = clip(do_sample=False, prompt_influence=1.0)
    assert greedy == clip(do_sample=False, prompt_influence=1.0)
    assert greedy != clip(do_sample=False, prompt_influence=4.0)


def test_the_elevenlabs_sdk_gets_its_sound(router: str) -> None:
    client = ElevenLabs(api_key="unused", base_url=router)
    audio = b"".join(
        client.text_to_sound_effects.convert(text=PROMPT, duration_seconds=1.0, output_format="pcm_32000")
    )
    assert len(audio) / 2 / RATE == pytest.approx(1.0, abs=0.021)


@pytest.mark.parametrize(
    ("body", "query", "status", "field"),
    [
        ({"model_id": "tts-1"}, {}, 400, "speech model"),
        ({"model_id": "nothing-here"}, {}, 404, "nothing-here"),
        ({"loop": True}, {}, 400, "loop"),
        ({"duration_seconds": 31}, {}, 422, "duration_seconds"),
        ({}, {"output_format": "mp3_1_2"}, 400, "output_format"),
    ],
)
def test_errors_are_in_elevenlabs_shape(router: str, body: dict, query: dict, status: int, field: str) -> None:
    response = httpx.post(
        f"{router}/v1/sound-generation", params=query, json={"text": PROMPT, **body}, timeout=60
    )
    assert response.status_code == status
    assert field in response.json()["detail"]["message"]


@pytest.mark.parametrize("model_id", [None, "tiny-sound", "eleven_text_to_sound_v2"])
@pytest.mark.parametrize(
    ("output_format", "codecs", "rate"),
    [("opus_48000_64", {"opus", "libopus"}, 48000), ("wav_44100", {"pcm_s16le"}, 44100)],
)
def test_every_way_to_name_the_model_in_other_formats(router: str, model_id, output_format, codecs, rate) -> None:
    body = {"duration_seconds": 0.5, **({"model_id": model_id} if model_id else {})}
    response = generate(router, output_format=output_format, **body)
    assert response.status_code == 200, response.text
    audio = decode(response.content)
    assert audio.codec in codecs and audio.sample_rate == rate
    assert audio.duration == pytest.approx(0.5, abs=0.15)
