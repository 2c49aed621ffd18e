"""Kokoro (functions/kokoro.py) in its own image (images/kokoro): a tiny ONNX model with the released
model's inputs and outputs and a voices file with the release's voice names, built by the test,
loaded by the image's worker through the production code, and driven over the worker protocol and
through `chorus serve` in http mode (as compose runs it) on every API family."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.audio import decode
from tests.tiny_models.harness import backend_python, build_tiny_model, router, synthesize, worker
from tests.tiny_models.harness import pcm as worker_pcm
from tests.tiny_models.kokoro_model import FRAMES_PER_TOKEN, SAMPLES_PER_FRAME

pytestmark = pytest.mark.images

RATE = 24000
#: The example config, as shipped, over the tiny files laid out where it names them.
EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tts-kokoro.yaml").read_text())
TIMELESS = {"name": "timeless", "backend": "kokoro", "parameters": {"model": "timeless/kokoro-v1.0.onnx"}}
CONFIGS = (EXAMPLE, TIMELESS)
TEXT = "Hello there, my friend. How are you today?"
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")


def build(folder: Path, *options: str) -> None:
    # The builder needs `onnx`, which this environment has and the image (onnxruntime alone) does not.
    build_tiny_model(Path(sys.executable), "kokoro_model", folder, *options)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kokoro")
    build(root / "models")
    build(root / "models" / "timeless", "--no-durations")
    return root


@pytest.fixture(scope="module")
def kokoro_worker(models: Path):
    configs = models / "configs"
    configs.mkdir()
    for number, config in enumerate(CONFIGS):
        (configs / f"{number}-{config['name']}.yaml").write_text(yaml.safe_dump(config))
    python, _ = backend_python("kokoro")
    with worker(python, "kokoro", configs, models / "models", models / "worker.log") as url:
        yield url


@pytest.fixture(scope="module")
def chorus(kokoro_worker: str, models: Path, tmp_path_factory: pytest.TempPathFactory):
    with router(tmp_path_factory.mktemp("router"), "kokoro", kokoro_worker, *CONFIGS) as url:
        yield url


def samples(response: httpx.Response) -> np.ndarray:
    return np.frombuffer(worker_pcm(response, RATE), dtype="<i2")


def speak(url: str, config: dict = EXAMPLE, **request: object) -> httpx.Response:
    return synthesize(url, config, **{"text": TEXT, **request})


def test_kokoro_speaks_24_khz_pcm_as_long_as_its_phonemes(kokoro_worker: str) -> None:
    audio = samples(speak(kokoro_worker))
    # Each phoneme lasts 4 frames of 600 samples (0.1 s): some 35 to 45 phonemes and the pause
    # after each sentence.
    seconds = len(audio) / RATE
    assert 3.5 <= seconds <= 5.5, seconds
    assert np.abs(audio).max() > 5000


def test_speed_is_applied_and_bounded(kokoro_worker: str) -> None:
    normal, fast = (len(samples(speak(kokoro_worker, speed=speed))) for speed in (1.0, 2.0))
    # Twice as fast: each phoneme's frames halve; the pauses between sentences stay.
    assert 0.4 < fast / normal < 0.65
    for speed in (0.25, 4.0):
        response = speak(kokoro_worker, speed=speed)
        assert response.status_code == 400 and response.json()["error"]["param"] == "speed", response.text


def test_a_voice_is_a_voice_of_the_file_or_a_weighted_mix_of_them(kokoro_worker: str) -> None:
    bella, sky = (samples(speak(kokoro_worker, voice=voice)) for voice in ("af_bella", "af_sky"))
    mix = samples(speak(kokoro_worker, voice="af_bella(2)+af_sky(1)"))
    assert not np.array_equal(bella, sky) and not np.array_equal(mix, bella) and not np.array_equal(mix, sky)
    # Weights count only as proportions; a voice with none weighs one.
    assert np.array_equal(mix, samples(speak(kokoro_worker, voice="af_bella(4) + af_sky(2)")))
    assert np.array_equal(samples(speak(kokoro_worker, voice="af_bella+af_sky")),
                          samples(speak(kokoro_worker, voice="af_bella(1)+af_sky(1)")))


@pytest.mark.parametrize(("voice", "says"), [
    ("af_nobody", "voice 'af_nobody' is not offered"),
    ("af_bella(2)+af_nobody", "voice 'af_nobody' is not offered"),
    ("af_bella+", "nor a mix"),
    ("af_bella(two)", "nor a mix"),
    ("af_bella(0)+af_sky", "above 0"),
    ("+".join(["af_sky"] * 9), "at most 8"),
])
def test_an_unknown_voice_or_a_bad_mix_is_the_clients_error(kokoro_worker: str, voice: str, says: str) -> None:
    response = speak(kokoro_worker, voice=voice)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "voice" and says in error["message"], error


def test_the_language_comes_from_the_voice_unless_the_request_names_one(kokoro_worker: str) -> None:
    assert speak(kokoro_worker, voice="ff_siwis").status_code == 200
    assert speak(kokoro_worker, voice="af_heart", language="fr").status_code == 200
    response = speak(kokoro_worker, language="tlh")
    assert response.status_code == 400 and response.json()["error"]["param"] == "language"


def test_missing_files_are_a_404_that_says_how_to_get_them(kokoro_worker: str) -> None:
    missing = {"name": "absent", "backend": "kokoro", "parameters": {"model": "absent/kokoro-v1.0.onnx"}}
    response = speak(kokoro_worker, missing)
    assert response.status_code == 404, response.text
    assert "chorus models pull kokoro" in response.json()["error"]["message"]


def test_every_openai_voice_speaks_with_a_kokoro_voice(chorus: str) -> None:
    for voice in OPENAI_VOICES:
        response = httpx.post(f"{chorus}/v1/audio/speech", timeout=60, json={
            "model": "kokoro", "input": "Hi.", "voice": voice, "response_format": "wav"})
        assert response.status_code == 200, (voice, response.text)
        assert decode(response.content).duration > 0.1


def test_every_api_family_speaks_kokoro(chorus: str) -> None:
    openai = httpx.post(f"{chorus}/v1/audio/speech", timeout=60, json={
        "model": "kokoro", "input": TEXT, "voice": "bm_george", "response_format": "mp3", "speed": 1.5})
    localai = httpx.post(f"{chorus}/tts", timeout=60, json={"model": "kokoro", "input": TEXT,
                                                           "voice": "af_bella(2)+af_sky(1)"})
    eleven = httpx.post(f"{chorus}/v1/text-to-speech/af_heart", params={"output_format": "pcm_24000"},
                        json={"text": TEXT, "model_id": "kokoro"}, timeout=60)
    streamed = httpx.post(f"{chorus}/v1/text-to-speech/af_heart/stream", params={"output_format": "mp3_44100_128"},
                          json={"text": TEXT, "model_id": "kokoro"}, timeout=60)
    for response in (openai, localai, eleven, streamed):
        assert response.status_code == 200, response.text
    assert decode(openai.content).container == "mp3" and decode(localai.content).container == "wav"
    assert decode(eleven.content, raw="s16le", rate=RATE).duration == pytest.approx(
        decode(localai.content).duration, abs=0.05)
    # speed 1.5 reached the model: shorter than the same text at 1.
    assert decode(openai.content).duration < 0.85 * decode(localai.content).duration


def test_the_voice_lists_name_kokoros_voices(chorus: str) -> None:
    openai = httpx.get(f"{chorus}/v1/audio/voices", timeout=60).json()
    eleven = httpx.get(f"{chorus}/v1/voices", timeout=60).json()
    assert "bm_george" in json.dumps(openai) and "alloy" in json.dumps(openai)
    assert {"af_heart", "ff_siwis"} <= {voice["voice_id"] for voice in eleven["voices"]}


@pytest.mark.parametrize(("family", "route", "body", "status"), [
    ("openai", "/v1/audio/speech", {"model": "kokoro", "input": TEXT, "voice": "af_nobody"}, 400),
    ("openai", "/v1/audio/speech", {"model": "kokoro", "input": TEXT, "voice": "af_bella(x)"}, 400),
    ("elevenlabs", "/v1/text-to-speech/af_nobody", {"model_id": "kokoro", "text": TEXT}, 404),
    ("elevenlabs", "/v1/text-to-speech/af_bella(0)+af_sky", {"model_id": "kokoro", "text": TEXT}, 404),
    ("localai", "/tts", {"model": "kokoro", "input": TEXT, "voice": "af_bella+"}, 400),
])
def test_unknown_voices_and_bad_mixes_in_each_familys_shape(chorus: str, family: str, route: str, body: dict,
                                                             status: int) -> None:
    response = httpx.post(f"{chorus}{route}", json=body, timeout=60)
    assert response.status_code == status, response.text
    payload = response.json()
    if family == "elevenlabs":
        assert payload["detail"]["status"] == "voice_not_found"
    else:
        assert "voice" in payload["error"]["message"]


def timestamps(chorus: str, model: str) -> dict:
    response = httpx.post(f"{chorus}/v1/text-to-speech/af_heart/with-timestamps", params={"output_format": "pcm_24000"},
                          json={"text": TEXT, "model_id": model}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_timestamps_are_measured_from_the_models_durations(chorus: str) -> None:
    body = timestamps(chorus, "kokoro")
    alignment = body["alignment"]
    assert "".join(alignment["characters"]) == TEXT
    starts, ends = alignment["character_start_times_seconds"], alignment["character_end_times_seconds"]
    seconds = len(base64.b64decode(body["audio_base64"])) / 2 / RATE
    assert ends[-1] == pytest.approx(seconds, abs=0.01)
    # The tiny model gives every phoneme (the space between words one too) 4 frames, 0.1 s: each
    # word starts one space after the word before it, the first sentence's on whole phonemes.
    per_phoneme = FRAMES_PER_TOKEN * SAMPLES_PER_FRAME / RATE
    for before, word in (("Hello", "there"), ("there,", "my"), ("my", "friend."), ("are", "you")):
        end, start = ends[TEXT.index(before) + len(before) - 1], starts[TEXT.index(word)]
        assert start - end == pytest.approx(per_phoneme, abs=0.002), (before, word)
        if word != "you":
            assert start / per_phoneme == pytest.approx(round(start / per_phoneme), abs=0.02), word


def test_a_model_without_durations_is_timed_by_its_chunks(chorus: str) -> None:
    body = timestamps(chorus, "timeless")
    alignment = body["alignment"]
    assert "".join(alignment["characters"]) == TEXT
    seconds = len(base64.b64decode(body["audio_base64"])) / 2 / RATE
    assert alignment["character_end_times_seconds"][-1] == pytest.approx(seconds, abs=0.01)
