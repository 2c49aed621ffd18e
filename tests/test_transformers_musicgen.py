"""MusicGen (functions/transformers_musicgen.py) in an environment built from images/transformers-musicgen: a
tiny random model saved to disk, loaded back offline by the worker, driven over the worker
protocol. Also: every heavy backend, asked for in an environment without its library, answers
a clear 503 through the router."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from functions.config import ModelConfig
from router.app import create_app
from router.registry import ModelRegistry
from router.settings import Settings
from tests.tiny_models.harness import batched, batches, concurrently, synthesize, tiny_worker
from tests.tiny_models.harness import pcm as worker_pcm

pytestmark = pytest.mark.images

RATE = 32000
MUSIC = {"name": "tiny-music", "backend": "transformers-musicgen", "parameters": {"model": "tiny-musicgen"}}
# A hub id that is in no models directory and no cache: with HF_HUB_OFFLINE=1 it must fail at
# once, with a message that says what to do.
HUB = {"name": "hub-music", "backend": "transformers-musicgen", "parameters": {"model": "facebook/musicgen-small"}}


@pytest.fixture(scope="module")
def music_worker(tmp_path_factory: pytest.TempPathFactory):
    with tiny_worker(tmp_path_factory.mktemp("musicgen"), "transformers-musicgen", "musicgen", MUSIC, HUB) as url:
        yield url


def pcm(response) -> np.ndarray:
    return np.frombuffer(worker_pcm(response, RATE), dtype="<i2")


def test_speech_route_input_is_the_whole_prompt_and_makes_about_ten_seconds(music_worker: str) -> None:
    audio = pcm(synthesize(music_worker, MUSIC, text="Calm piano. Soft rain on a window.", seed=1))
    # LocalAI's 512 tokens, less the codebook delay: 509 frames of 20 ms.
    assert len(audio) / RATE == pytest.approx(10.18, abs=0.05)
    assert audio.std() > 0


def test_duration_sets_the_length(music_worker: str) -> None:
    for seconds in (0.4, 0.8):
        audio = pcm(synthesize(music_worker, MUSIC, text="A dog barks", duration_seconds=seconds))
        assert len(audio) / RATE == pytest.approx(seconds, abs=0.021)


def test_prompt_guidance_and_sampling_reach_the_model(music_worker: str) -> None:
    def clip(**fields: object) -> bytes:
        fields = {"text": "Calm piano", "duration_seconds": 0.3, "seed": 7, **fields}
        return pcm(synthesize(music_worker, MUSIC, **fields)).tobytes()

    assert clip() == clip(), "the same prompt and seed must give the same audio"
    assert clip() != clip(text="Loud drums and bass")
    assert clip(guidance_scale=1.0) != clip(guidance_scale=5.0)
    # Greedy decoding ignores the seed; sampling does not.
    assert clip(do_sample=False, seed=1) == clip(do_sample=False, seed=2)
    assert clip(do_sample=True, seed=1) != clip(do_sample=True, seed=2)


def test_speed_is_refused_rather_than_ignored(music_worker: str) -> None:
    response = synthesize(music_worker, MUSIC, text="Calm piano", duration_seconds=0.2, speed=1.5)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "speed"


def test_a_hub_id_absent_offline_fails_at_load_with_a_clear_error(music_worker: str) -> None:
    import httpx

    failed = httpx.get(f"{music_worker}/healthz").json()["failed"]
    assert "facebook/musicgen-small" in failed["hub-music"]
    assert "HF_HUB_OFFLINE=1" in failed["hub-music"] and "models directory" in failed["hub-music"]
    response = synthesize(music_worker, HUB, text="Calm piano", duration_seconds=0.2)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "HF_HUB_OFFLINE=1" in response.json()["error"]["message"]


def test_four_prompts_at_once_share_one_generation_each_at_its_own_length(music_worker: str) -> None:
    config = batched(MUSIC, "tiny-music-4", 4)
    prompts = {"A dog barks": 0.2, "Calm piano": 0.4, "Loud drums and bass": 0.6, "Rain on a window": 0.8}
    responses = concurrently(music_worker, *((config, {"text": text, "duration_seconds": seconds})
                                              for text, seconds in prompts.items()))
    clips = [pcm(response) for response in responses]
    assert batches(music_worker, "tiny-music-4") == (1, 4)
    for clip, seconds in zip(clips, prompts.values(), strict=True):
        assert len(clip) / RATE == pytest.approx(seconds, abs=0.021)
        assert clip.std() > 0
    assert len({clip[:RATE // 5].tobytes() for clip in clips}) == 4, "each prompt must make its own sound"


def test_a_seeded_prompt_goes_alone_and_sounds_as_it_does_unbatched(music_worker: str) -> None:
    config = batched(MUSIC, "tiny-music-2", 2)
    seeded = {"text": "Calm piano", "duration_seconds": 0.3, "seed": 7}
    responses = concurrently(music_worker, (config, seeded), (config, {"text": "A dog barks", "duration_seconds": 0.2}),
                             (config, {"text": "Rain", "duration_seconds": 0.5}))
    # The two unseeded prompts together, the seeded one alone.
    assert batches(music_worker, "tiny-music-2") == (2, 3)
    assert pcm(responses[0]).tobytes() == pcm(synthesize(music_worker, MUSIC, **seeded)).tobytes()
    assert [len(pcm(response)) / RATE for response in responses[1:]] == pytest.approx([0.2, 0.5], abs=0.021)


def test_a_member_whose_client_leaves_mid_generation_leaves_the_others_whole(music_worker: str) -> None:
    config = batched(MUSIC, "tiny-music-left", 3)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            def send(**fields: object) -> asyncio.Task[httpx.Response]:
                body = {"config": config, "request": {"model": config["name"], **fields}}
                return asyncio.ensure_future(client.post(f"{music_worker}/synthesize", json=body))

            # The one that leaves asks for the longest clip: the batch generates for as long.
            leaving = send(text="A long storm", duration_seconds=8)
            staying = [send(text="A dog barks", duration_seconds=0.3), send(text="Calm piano", duration_seconds=0.5)]
            while batches(music_worker, config["name"]) == (0, 0):
                await asyncio.sleep(0.05)  # until the batch has started
            leaving.cancel()
            return await asyncio.gather(*staying)

    responses = asyncio.run(scenario())
    assert batches(music_worker, config["name"]) == (1, 3)
    assert [len(pcm(response)) / RATE for response in responses] == pytest.approx([0.3, 0.5], abs=0.021)
    # The worker serves on.
    assert len(pcm(synthesize(music_worker, MUSIC, text="Calm piano", duration_seconds=0.2))) / RATE == pytest.approx(0.2, abs=0.021)


@pytest.mark.parametrize(
    ("backend", "image"),
    [("transformers-musicgen", "transformers-musicgen"), ("bark", "bark"), ("parler-tts", "parler-tts")],
)
def test_missing_library_is_a_clear_503_naming_backend_and_image(
    backend: str, image: str, tmp_path: Path
) -> None:
    # The router's own environment holds neither torch nor transformers.
    config = ModelConfig(name="heavy", backend=backend, parameters={"model": "some-model"})
    app = create_app(
        Settings(configs_dir=tmp_path, models_dir=tmp_path), ModelRegistry([config], tmp_path)
    )
    with TestClient(app) as client:
        response = client.post("/tts", json={"model": "heavy", "input": "Hello there."})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert f"backend '{backend}' is not installed" in message
    assert f"images/{image}" in message
    assert "Traceback" not in response.text
