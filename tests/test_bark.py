"""Bark (functions/bark.py) in an environment built from images/bark: a tiny random BarkModel with
two voice presets saved to disk, loaded back offline by the worker, driven over the worker
protocol."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.audio import audio_seconds, pcm_seconds
from tests.tiny_models.harness import batched, batches, concurrently, router, synthesize, tiny_worker
from tests.tiny_models.harness import pcm as worker_pcm

pytestmark = pytest.mark.images

RATE = 24000
BARK = {"name": "tiny-bark", "backend": "bark", "parameters": {"model": "tiny-bark"}}
WITH_VOICE = {**BARK, "name": "tiny-bark-voice", "tts": {"voice": "v2/en_speaker_1"}}
TEXT = "Hello there, friend."


@pytest.fixture(scope="module")
def bark_worker(tmp_path_factory: pytest.TempPathFactory):
    with tiny_worker(tmp_path_factory.mktemp("bark"), "bark", "bark", BARK) as url:
        yield url


def pcm(response: httpx.Response) -> bytes:
    return worker_pcm(response, RATE)


def test_synthesis_returns_24_khz_pcm_of_a_plausible_length(bark_worker: str) -> None:
    audio = np.frombuffer(pcm(synthesize(bark_worker, BARK, text=TEXT, seed=1)), dtype="<i2")
    # The tiny model's semantic stage stops after 40 tokens: 0.8 s of audio.
    assert len(audio) / RATE == pytest.approx(0.8, abs=0.05)
    assert audio.std() > 0


def test_voice_presets_reach_the_model(bark_worker: str) -> None:
    def clip(config: dict = BARK, **fields: object) -> bytes:
        return pcm(synthesize(bark_worker, config, **{"text": TEXT, "seed": 3, **fields}))

    speaker_0 = clip(voice="v2/en_speaker_0")
    assert speaker_0 == clip(voice="v2/en_speaker_0")
    assert speaker_0 != clip(voice="v2/en_speaker_1")
    # The router puts the config's `tts.voice` into the request; a worker given the request's
    # voice uses it, and given the config's voice speaks with that.
    assert clip(WITH_VOICE, voice="v2/en_speaker_1") == clip(voice="v2/en_speaker_1")


def test_four_requests_at_once_share_one_generation_each_with_its_own_audio(bark_worker: str) -> None:
    config = batched(BARK, "tiny-bark-4", 4)
    texts = [TEXT, "Good morning to you all.", "Yes.", "What a day it has been, and what a night."]
    asked = [(config, {"text": text, "voice": "v2/en_speaker_1"}) for text in texts]
    clips = [pcm(response) for response in concurrently(bark_worker, *asked)]
    assert batches(bark_worker, "tiny-bark-4") == (1, 4)
    assert len(set(clips)) == 4, "each text must make its own audio"
    for clip in clips:
        # The tiny model's semantic stage stops after 40 tokens whatever the text: 0.8 s each.
        assert pcm_seconds(clip, RATE) == pytest.approx(0.8, abs=0.05)
        assert np.frombuffer(clip, dtype="<i2").std() > 0


def test_a_seeded_request_goes_alone_and_sounds_as_it_does_unbatched(bark_worker: str) -> None:
    config = batched(BARK, "tiny-bark-2", 2)
    seeded = {"text": TEXT, "voice": "v2/en_speaker_0", "seed": 3}
    responses = concurrently(bark_worker, (config, seeded), (config, {"text": "Yes."}), (config, {"text": TEXT}))
    assert batches(bark_worker, "tiny-bark-2") == (2, 3)
    assert pcm(responses[0]) == pcm(synthesize(bark_worker, BARK, **seeded))
    assert all(pcm(response) for response in responses[1:])


def test_voices_lists_the_presets(bark_worker: str) -> None:
    response = httpx.post(f"{bark_worker}/voices", json={"config": BARK})
    assert response.json() == {"voices": ["v2/en_speaker_0", "v2/en_speaker_1"]}


def test_unknown_preset_is_a_400_and_never_read_as_a_file(bark_worker: str) -> None:
    for voice in ("v2/en_speaker_9", "../../../etc/passwd"):
        response = synthesize(bark_worker, BARK, text=TEXT, voice=voice)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "voice" and "v2/en_speaker_0" in error["message"]


def test_a_preset_named_as_the_model_is_the_voice_localai_style(bark_worker: str) -> None:
    # LocalAI's `model: v2/en_speaker_4`: the preset is the voice and the weights are suno's,
    # which this offline machine does not have: the load fails at once, naming both.
    config = {"name": "preset-model", "backend": "bark", "parameters": {"model": "v2/en_speaker_4"}}
    response = synthesize(bark_worker, config, text=TEXT)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    message = response.json()["error"]["message"]
    assert "suno/bark" in message and "HF_HUB_OFFLINE=1" in message


def test_the_router_serves_bark_presets_by_their_listed_ids(bark_worker: str, tmp_path) -> None:
    # Through `chorus serve` in http mode, as compose runs it: the ElevenLabs voice ids Bark lists
    # hold a slash (v2/en_speaker_1), and a client must be able to speak with each of them.
    with router(tmp_path, "bark", bark_worker, BARK) as url:
        listed = [v["voice_id"] for v in httpx.get(f"{url}/v1/voices", timeout=60).json()["voices"]]
        presets = [voice for voice in listed if "/" in voice]
        assert presets, listed
        takes = set()
        for voice in presets:
            response = httpx.post(
                f"{url}/v1/text-to-speech/{voice}", params={"output_format": "wav_24000"},
                json={"text": TEXT, "model_id": "tiny-bark", "seed": 3}, timeout=300,
            )
            assert response.status_code == 200, response.text
            assert audio_seconds(response.content) == pytest.approx(0.8, abs=0.1)
            takes.add(response.content)
        assert len(takes) == len(presets), "each preset must reach the model"
