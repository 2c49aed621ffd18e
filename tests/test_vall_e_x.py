"""VALL-E X backend, in an environment built from images/vall-e-x (its install.sh), with tiny
random weights placed where the unchanged tts-webui-valle-x loaders look (see
tests/tiny_models/valle_models.py), served by a backend worker process."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.audio import audio_seconds, encoded_voice, write_voice_like_wav
from tests.containers import image_python
from tests.processes import REPO, backend_worker, chorus_server

pytestmark = pytest.mark.images

TINY_MODELS = REPO / "tests" / "tiny_models"

CONFIGS = {
    "valle.yaml": """
        name: valle
        backend: vall-e-x
    """,
    # LocalAI's documented cloning example, plus the transcript that spares a Whisper model.
    "cloned-voice.yaml": """
        name: cloned-voice
        backend: vall-e-x
        parameters:
          model: "cloned-voice"
        vall-e:
          # The path to the audio file to be cloned
          # relative to the models directory
          audio_path: "path-to-wav-source.wav"
          transcript: "Hello there, how are you today?"
    """,
    # The same example exactly as LocalAI documents it: no transcript, and no Whisper here.
    "cloned-voice-untranscribed.yaml": """
        name: cloned-voice-untranscribed
        backend: vall-e-x
        parameters:
          model: "cloned-voice"
        vall-e:
          audio_path: "path-to-wav-source.wav"
    """,
    "too-long.yaml": """
        name: too-long
        backend: vall-e-x
        tts:
          vall-e:
            audio_path: long.wav
            transcript: "A very long reference."
    """,
}


@pytest.fixture(scope="module")
def python() -> Path:
    return image_python("vall-e-x")


@pytest.fixture(scope="module")
def setup(python, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valle")
    paths = {name: root / name for name in ("models", "configs", "torch", "hf", "cache", "site")}
    for path in paths.values():
        path.mkdir()
    started = time.monotonic()
    subprocess.run([str(python), str(TINY_MODELS / "valle_models.py"), str(paths["models"]),
                    str(paths["torch"]), str(paths["hf"])], check=True, cwd=REPO, capture_output=True)
    print(f"tiny VALL-E X built in {time.monotonic() - started:.1f} s")
    # Every process of this environment that the test starts loads the tiny architecture.
    (paths["site"] / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TINY_MODELS)!r})\n"
        "import valle_models\nvalle_models.shrink()\n"
    )
    write_voice_like_wav(paths["models"] / "path-to-wav-source.wav", 3.0, 24000)
    write_voice_like_wav(paths["models"] / "long.wav", 16.0, 24000)
    for name, text in CONFIGS.items():
        (paths["configs"] / name).write_text(textwrap.dedent(text))
    return {"root": root, **paths}


@pytest.fixture(scope="module")
def worker(python, setup) -> Iterator[str]:
    env = {
        "TORCH_HOME": str(setup["torch"]),
        "HF_HOME": str(setup["hf"]),
        "HF_HUB_OFFLINE": "1",
        "CHORUS_CACHE_DIR": str(setup["cache"]),
        # The tiny-architecture hook first, then the repository for the worker itself.
        "PYTHONPATH": f"{setup['site']}{os.pathsep}{REPO}",
    }
    started = time.monotonic()
    with backend_worker(python, "vall-e-x", setup["configs"], setup["models"], setup["root"] / "worker.log",
                        env=env, cwd=setup["root"]) as url:
        print(f"VALL-E X worker loaded in {time.monotonic() - started:.1f} s")
        yield url


def _config(setup, name: str) -> dict:
    return yaml.safe_load((setup["configs"] / f"{name}.yaml").read_text())


def synthesize(worker, setup, model: str, **request) -> np.ndarray:
    started = time.monotonic()
    body = {"config": _config(setup, model), "request": {"model": model, "text": "Hello world.", **request}}
    response = httpx.post(f"{worker}/synthesize", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == "24000"
    samples = np.frombuffer(response.content, dtype="<i2")
    print(f"VALL-E X {model}: {len(samples) / 24000:.2f} s of audio in {time.monotonic() - started:.2f} s")
    return samples


def test_plain_synthesis(worker, setup):
    samples = synthesize(worker, setup, "valle", seed=5)
    # The tiny model ends a clip at a random frame: any whole EnCodec frame (320 samples) counts.
    assert len(samples) >= 320 and np.abs(samples).max() > 0


def test_cloned_voice_conditions_the_model_and_is_listed(worker, setup):
    cloned = synthesize(worker, setup, "cloned-voice", seed=5)
    plain = synthesize(worker, setup, "valle", seed=5)
    assert len(cloned) >= 320
    assert cloned.tobytes() != plain.tobytes(), "the cloned prompt must change the audio"
    listed = httpx.post(f"{worker}/voices", json={"config": _config(setup, "cloned-voice")}).json()
    assert listed["voices"][0] == "cloned-voice"
    assert "alan" in listed["voices"]  # the package's bundled presets


def test_prompt_is_written_to_the_cache_not_the_package(worker, setup, python):
    assert list((setup["cache"] / "vall-e-x").glob("cloned-voice-*.npz"))
    customs = subprocess.run(
        [str(python), "-c", "import valle_x, pathlib; print(pathlib.Path(valle_x.__file__).parent / 'customs')"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert not list(Path(customs).glob("*.npz"))


def test_unknown_voice_or_language_is_a_400(worker, setup):
    for request in ({"voice": "nobody"}, {"language": "fr"}):
        body = {"config": _config(setup, "valle"), "request": {"model": "valle", "text": "Hi.", **request}}
        response = httpx.post(f"{worker}/synthesize", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == next(iter(request))


def test_bad_references_are_refused_with_clear_errors(worker):
    failed = httpx.get(f"{worker}/healthz").json()["failed"]
    assert "16.0 s" in failed["too-long"] and "at most 15 s" in failed["too-long"]
    assert "tts.vall-e.transcript" in failed["cloned-voice-untranscribed"]
    assert "whisper" in failed["cloned-voice-untranscribed"].lower()


def test_router_serves_valle_on_all_three_api_families(worker, setup, tmp_path):
    env = {"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"vall-e-x={worker}"}
    with chorus_server(setup["models"], tmp_path / "router.log", configs_dir=setup["configs"],
                       env=env) as router:
        localai = httpx.post(f"{router.url}/tts", timeout=300,
                             json={"model": "cloned-voice", "backend": "vall-e-x", "input": "Hello!"})
        assert localai.status_code == 200, localai.text
        assert audio_seconds(localai.content) > 0

        openai = httpx.post(f"{router.url}/v1/audio/speech", timeout=300, json={
            "model": "valle", "input": "Hello!", "voice": "alloy", "response_format": "wav"})
        assert openai.status_code == 200, openai.text
        assert audio_seconds(openai.content) > 0

        eleven = httpx.post(f"{router.url}/v1/text-to-speech/cloned-voice", timeout=300,
                            json={"text": "Hello!", "model_id": "cloned-voice"})
        assert eleven.status_code == 200, eleven.text
        assert audio_seconds(eleven.content) > 0

        listed = httpx.get(f"{router.url}/v1/audio/voices", timeout=60).json()["voices"]
        assert ("cloned-voice", "cloned-voice") in {(v["model"], v["id"]) for v in listed}


def test_a_saved_voice_is_cloned_from_its_recording_and_transcript(worker, setup, tmp_path):
    """A LocalAI voice profile (with its transcript) uploaded to the router, in the models
    directory the worker shares, spoken by VALL-E X; a recording longer than it clones from is cut
    to it. One saved without a transcript is refused (no Whisper here), naming what is missing."""
    env = {"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"vall-e-x={worker}"}
    with chorus_server(setup["models"], tmp_path / "router.log", configs_dir=setup["configs"],
                       env=env) as router, httpx.Client(base_url=router.url, timeout=300) as http:
        clip = ("me.flac", encoded_voice(20, rate=24000, fmt="flac"), "audio/flac")
        profile = http.post("/api/voice-profiles", files={"audio": clip}, data={
            "name": "Reader", "consent": "true", "transcript": "Hello there, how are you today?"}).json()
        spoken = http.post("/tts", json={"model": "valle", "input": "Hello!", "voice": profile["uri"]})
        assert spoken.status_code == 200, spoken.text
        assert audio_seconds(spoken.content) > 0

        untranscribed = http.post("/v1/voices/add", data={"name": "Quiet"}, files={"files": clip}).json()["voice_id"]
        refused = http.post(f"/v1/text-to-speech/{untranscribed}", json={"text": "Hello!", "model_id": "valle"})
        assert refused.status_code == 400 and "save it with its transcript" in refused.text
        for voice_id in (profile["id"], untranscribed):
            assert http.delete(f"/v1/voices/{voice_id}").status_code == 200
