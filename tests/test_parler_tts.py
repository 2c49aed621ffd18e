"""Parler-TTS (functions/parler_tts.py) in an environment built from images/parler-tts (parler-tts
pins transformers 4.46.1): a tiny random model saved to disk, loaded back offline by the worker,
driven over the worker protocol."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.audio import audio_seconds, pcm_seconds
from tests.tiny_models.harness import batched, batches, concurrently, router, synthesize, tiny_worker
from tests.tiny_models.harness import pcm as worker_pcm

pytestmark = pytest.mark.images

RATE = 24000
PARLER = {"name": "tiny-parler", "backend": "parler-tts", "parameters": {"model": "tiny-parler"}}
TEXT = "Hello there, friend."
CALM = "A calm male voice, slow and low-pitched."
EXCITED = "An excited woman speaking very fast."
#: LocalAI's parler-tts backend's description for requests that give none.
LOCALAI_DESCRIPTION = (
    "A female speaker with a slightly low-pitched voice delivers her words quite expressively, "
    "in a very confined sounding environment with clear audio quality. She speaks very fast."
)


@pytest.fixture(scope="module")
def parler_worker(tmp_path_factory: pytest.TempPathFactory):
    with tiny_worker(tmp_path_factory.mktemp("parler"), "parler-tts", "parler", PARLER) as url:
        yield url


def pcm(response: httpx.Response) -> bytes:
    return worker_pcm(response, RATE)


def test_synthesis_returns_24_khz_pcm_of_a_plausible_length(parler_worker: str) -> None:
    audio = np.frombuffer(pcm(synthesize(parler_worker, PARLER, text=TEXT, seed=1)), dtype="<i2")
    # The tiny model stops at its 60-step limit at most: under 0.8 s at 75 frames a second.
    assert 0.3 <= len(audio) / RATE <= 0.8
    assert audio.std() > 0


def test_the_description_reaches_the_model(parler_worker: str) -> None:
    def clip(**fields: object) -> bytes:
        return pcm(synthesize(parler_worker, PARLER, **{"text": TEXT, "seed": 5, **fields}))

    calm = clip(voice=CALM)
    assert calm == clip(voice=CALM)
    assert calm != clip(voice=EXCITED)
    # OpenAI's `instructions` describe the voice too, over `voice`.
    assert clip(voice=CALM, instructions=EXCITED) == clip(voice=EXCITED)
    # With no description at all, LocalAI's default one is used.
    assert clip() == clip(voice=LOCALAI_DESCRIPTION)


def test_four_requests_at_once_share_one_generation_each_with_its_own_voice_and_end(parler_worker: str) -> None:
    config = batched(PARLER, "tiny-parler-4", 4)
    asked = [{"text": TEXT, "voice": CALM}, {"text": "Good morning to you all.", "voice": EXCITED},
             {"text": "Yes."}, {"text": TEXT, "instructions": "A whispering old man."}]
    clips = [pcm(response) for response in concurrently(parler_worker, *((config, fields) for fields in asked))]
    assert batches(parler_worker, "tiny-parler-4") == (1, 4)
    assert len(set(clips)) == 4, "each description and text must make its own audio"
    longest = max(len(clip) for clip in clips)
    for clip in clips:
        assert 0 < pcm_seconds(clip, RATE) <= 0.8
        # Each clip ends where its own audio does, not padded to the longest's.
        assert len(clip) == longest or any(clip[-480:]), "a shorter clip kept the batch's padding"


def test_a_seeded_request_goes_alone_and_sounds_as_it_does_unbatched(parler_worker: str) -> None:
    config = batched(PARLER, "tiny-parler-2", 2)
    seeded = {"text": TEXT, "voice": CALM, "seed": 5}
    responses = concurrently(parler_worker, (config, seeded), (config, {"text": "Yes."}), (config, {"text": TEXT}))
    assert batches(parler_worker, "tiny-parler-2") == (2, 3)
    assert pcm(responses[0]) == pcm(synthesize(parler_worker, PARLER, **seeded))
    assert all(pcm(response) for response in responses[1:])


def test_speed_is_refused_rather_than_ignored(parler_worker: str) -> None:
    response = synthesize(parler_worker, PARLER, text=TEXT, speed=0.5)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "speed"


def test_the_router_serves_parler_on_every_api_family(parler_worker: str, tmp_path) -> None:
    # Through `chorus serve` in http mode, as compose runs it.
    with router(tmp_path, "parler-tts", parler_worker, PARLER) as url:
        openai = httpx.post(f"{url}/v1/audio/speech", timeout=300, json={
            "model": "tiny-parler", "input": TEXT, "voice": "alloy", "instructions": CALM, "response_format": "wav"})
        localai = httpx.post(f"{url}/tts", timeout=300, json={"model": "tiny-parler", "input": TEXT})

        def eleven(seed: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/text-to-speech/alloy", params={"output_format": "pcm_24000"},
                              json={"text": TEXT, "model_id": "tiny-parler", "seed": seed}, timeout=300)

        seeded = [eleven(7), eleven(7), eleven(8)]
    for response in (openai, localai, *seeded):
        assert response.status_code == 200, response.text
    for response in (openai, localai):
        # Unseeded, the tiny random model may stop after a frame or two; never past its limit.
        assert 0 < audio_seconds(response.content) <= 0.8
    # ElevenLabs' seed reaches the model: the same seed, the same take; another, another.
    assert seeded[0].content == seeded[1].content != seeded[2].content
