"""Coqui backend, in an environment built from images/coqui (its install.sh), against tiny
models the test builds: a two-speaker, two-language VITS and a cloning XTTS v2, both loaded back
from disk by the production code in a backend worker process, plus the same XTTS placed in a
Hugging Face cache so that LocalAI's documented `xtts_v2` config loads it by name, offline."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from functions.protocol import FrameReader
from tests.audio import MP3, audio_seconds, decode, encoded_voice, write_voice_like_wav
from tests.containers import image_python
from tests.processes import REPO, backend_worker, chorus_server

pytestmark = pytest.mark.images

BUILDER = REPO / "tests" / "tiny_models" / "coqui_models.py"

CONFIGS = {
    "vits.yaml": """
        name: vits
        backend: coqui
        parameters:
          model: vits/model.pth
    """,
    "xtts-clone.yaml": """
        name: xtts-clone
        backend: coqui
        parameters:
          model: xtts
          language: en
        tts:
          voice: voices/reference.wav
        voices:
          narrator: voices/reference.wav
    """,
    # LocalAI's documented example, unchanged.
    "xtts_v2.yaml": """
        name: xtts_v2
        backend: coqui
        parameters:
          language: fr
          model: tts_models/multilingual/multi-dataset/xtts_v2

        tts:
          voice: Ana Florence
    """,
}
# The same XTTS, each chunk's audio sent piece by piece as it is made.
CONFIGS["xtts-stream.yaml"] = (CONFIGS["xtts-clone.yaml"].replace("name: xtts-clone", "name: xtts-stream")
                               .replace("tts:\n", "tts:\n          stream: true\n"))


@pytest.fixture(scope="module")
def python() -> Path:
    return image_python("coqui")


@pytest.fixture(scope="module")
def setup(python, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coqui")
    models, configs, hf_home = root / "models", root / "configs", root / "hf"
    started = time.monotonic()
    for kind, target in (("vits", models / "vits"), ("xtts", models / "xtts"), ("xtts-hf", hf_home)):
        subprocess.run([str(python), str(BUILDER), kind, str(target)], check=True, cwd=REPO,
                       capture_output=True)
    print(f"tiny Coqui models built in {time.monotonic() - started:.1f} s")
    write_voice_like_wav(models / "voices" / "reference.wav", 3.0, 22050)
    write_voice_like_wav(root / "outside.wav", 3.0, 22050)
    configs.mkdir()
    for name, text in CONFIGS.items():
        (configs / name).write_text(textwrap.dedent(text))
    return {"root": root, "models": models, "configs": configs, "hf_home": hf_home}


@contextmanager
def running_worker(python: Path, setup: dict[str, Path]) -> Iterator[str]:
    # What the Coqui image sets: a pre-filled cache, read offline.
    env = {
        "HF_HOME": str(setup["hf_home"]),
        "TTS_HOME": str(setup["root"] / "tts_home"),
        "HF_HUB_OFFLINE": "1",
        "COQUI_TOS_AGREED": "1",
    }
    started = time.monotonic()
    with backend_worker(python, "coqui", setup["configs"], setup["models"], setup["root"] / "worker.log",
                        env=env) as url:
        print(f"Coqui worker loaded {len(CONFIGS)} models in {time.monotonic() - started:.1f} s")
        yield url


@pytest.fixture(scope="module")
def worker(python, setup) -> Iterator[str]:
    with running_worker(python, setup) as url:
        yield url


def _config(setup, name: str) -> dict:
    import yaml

    return yaml.safe_load((setup["configs"] / f"{name}.yaml").read_text())


def synthesize(worker: str, setup, model: str, **request) -> httpx.Response:
    body = {"config": _config(setup, model), "request": {"model": model, "text": "hello world", **request}}
    return httpx.post(f"{worker}/synthesize", json=body, timeout=120)


def pcm(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-format"] == "s16le"
    return np.frombuffer(response.content, dtype="<i2")


def voices(worker: str, setup, model: str) -> list[str]:
    response = httpx.post(f"{worker}/voices", json={"config": _config(setup, model)}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["voices"]


# --- multi-speaker, multi-language VITS ------------------------------------------------------


def test_vits_lists_its_speakers(worker, setup):
    assert voices(worker, setup, "vits") == ["alice", "bob"]


def test_vits_speaker_and_language_reach_the_model(worker, setup):
    def run(voice, language):
        started = time.monotonic()
        samples = pcm(synthesize(worker, setup, "vits", voice=voice, language=language, seed=7))
        print(f"VITS {voice}/{language}: {len(samples) / 16000:.2f} s of audio in "
              f"{time.monotonic() - started:.2f} s")
        return samples

    alice_en = run("alice", "en")
    assert len(alice_en) > 1600 and np.abs(alice_en).max() > 0
    assert np.array_equal(alice_en, run("alice", "en")), "same seed, same speaker: same audio"
    bob_en, alice_fr = run("bob", "en"), run("alice", "fr")
    assert not np.array_equal(alice_en[: len(bob_en)], bob_en[: len(alice_en)])
    assert not np.array_equal(alice_en[: len(alice_fr)], alice_fr[: len(alice_en)])


def test_vits_missing_or_unknown_language_is_a_clear_400(worker, setup):
    for language in (None, "xx"):
        response = synthesize(worker, setup, "vits", voice="alice", language=language)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "language"
        assert "en, fr" in error["message"]


def test_vits_unknown_speaker_is_a_400(worker, setup):
    response = synthesize(worker, setup, "vits", voice="carol", language="en")
    assert response.status_code == 400
    assert "alice, bob" in response.json()["error"]["message"]


# --- XTTS cloning ----------------------------------------------------------------------------


def test_xtts_clones_from_a_reference_in_the_models_directory(worker, setup):
    assert "voices/reference.wav" in voices(worker, setup, "xtts-clone")
    timings = []
    for _ in range(2):
        started = time.monotonic()
        samples = pcm(synthesize(worker, setup, "xtts-clone", language="en", seed=3))
        timings.append(time.monotonic() - started)
        assert len(samples) > 2400 and np.abs(samples).max() > 0
    print(f"XTTS clone: {len(samples) / 24000:.2f} s of audio; first request (encodes the "
          f"reference) {timings[0]:.2f} s, second (cached latents) {timings[1]:.2f} s")


def pieces(worker: str, setup, model: str, **request) -> Iterator[bytes]:
    """The PCM pieces of one request as the backend yielded them: a request for word times gets
    each piece in a frame of its own (Coqui measures none, so all are audio)."""
    body = {"config": _config(setup, model),
            "request": {"model": model, "text": "hello world", "word_times": True, **request}}
    with httpx.stream("POST", f"{worker}/synthesize", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        reader = FrameReader()
        for data in response.iter_bytes():
            yield from reader.feed(data)


def test_xtts_streams_a_chunk_piece_by_piece(worker, setup):
    streamed = list(pieces(worker, setup, "xtts-stream", language="en", seed=3))
    whole = pcm(synthesize(worker, setup, "xtts-clone", language="en", seed=3))
    assert len(streamed) > 1 and all(isinstance(piece, bytes) and piece for piece in streamed)
    # The same seed samples the same tokens: as long as the whole chunk made at once. Only the
    # pieces' crossfaded seams differ.
    joined = np.frombuffer(b"".join(streamed), dtype="<i2")
    assert len(joined) == len(whole) and np.abs(joined).max() > 0
    assert list(pieces(worker, setup, "xtts-stream", language="en", seed=3)) == streamed, \
        "same seed: same pieces"


def test_a_client_leaving_mid_stream_frees_the_model(worker, setup):
    stream = pieces(worker, setup, "xtts-stream", language="en", seed=5)
    assert next(stream)
    stream.close()  # leaves with the rest of the chunk unread
    # One synthesis at a time per model: this is made only once the left stream let go.
    assert len(list(pieces(worker, setup, "xtts-stream", language="en", seed=5))) > 1


def test_xtts_stream_holds_the_model_until_closed(python, setup):
    """In the backend itself: the model's lock is held from the first piece until the consumer
    closes the stream, and a closed stream frees it."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        import yaml
        from functions import create_backend
        from functions.config import ModelConfig
        from functions.protocol import SynthesisRequest
        config = ModelConfig.model_validate(yaml.safe_load(Path({str(setup["configs"] / "xtts-stream.yaml")!r}).read_text()))
        backend = create_backend(config, Path({str(setup["models"])!r}))
        backend.load()
        request = SynthesisRequest(model="xtts-stream", text="hello world", language="en", seed=5)
        stream = backend.synthesize(request)
        assert next(stream) and backend._lock.locked()
        stream.close()
        assert not backend._lock.locked()
        assert len(list(backend.synthesize(request))) > 1 and not backend._lock.locked()
        print("ok")
    """)
    result = subprocess.run([str(python), "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("voice", ["../outside.wav", "/etc/passwd", "voices/../../outside.wav"])
def test_xtts_reference_cannot_leave_the_models_directory(worker, setup, voice):
    response = synthesize(worker, setup, "xtts-clone", language="en", voice=voice)
    assert response.status_code == 400, response.text
    assert "outside the models directory" in response.json()["error"]["message"]


def test_xtts_missing_reference_is_a_400(worker, setup):
    response = synthesize(worker, setup, "xtts-clone", language="en", voice="voices/nobody.wav")
    assert response.status_code == 400
    assert "Ana Florence" in response.json()["error"]["message"]


def test_localai_xtts_v2_config_loads_by_name_offline(worker, setup):
    assert voices(worker, setup, "xtts_v2") == ["Ana Florence"]
    samples = pcm(synthesize(worker, setup, "xtts_v2", voice="Ana Florence", language="fr"))
    assert len(samples) > 2400


# --- through the router, in http mode, the way compose wires it -------------------------------


def test_router_serves_coqui_on_all_three_api_families(worker, setup, tmp_path):
    env = {"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"coqui={worker}"}
    with chorus_server(setup["models"], tmp_path / "router.log", configs_dir=setup["configs"],
                       env=env) as router:
        localai = httpx.post(f"{router.url}/tts", timeout=120, json={
            "model": "vits", "input": "hello there", "voice": "bob", "language": "fr"})
        assert localai.status_code == 200, localai.text
        assert audio_seconds(localai.content) > 0.1

        openai = httpx.post(f"{router.url}/v1/audio/speech", timeout=120, json={
            "model": "xtts_v2", "input": "bonjour", "voice": "alloy", "response_format": "wav"})
        assert openai.status_code == 200, openai.text
        assert audio_seconds(openai.content) > 0.1

        eleven = httpx.post(f"{router.url}/v1/text-to-speech/narrator", timeout=120,
                            json={"text": "hello", "model_id": "xtts-clone", "language_code": "en"})
        assert eleven.status_code == 200, eleven.text
        assert audio_seconds(eleven.content) > 0.1

        missing = httpx.post(f"{router.url}/tts", timeout=60, json={"model": "vits", "input": "hi"})
        assert missing.status_code == 400
        assert "en, fr" in missing.text

        listed = httpx.get(f"{router.url}/v1/audio/voices", timeout=60).json()["voices"]
        assert {("vits", "alice"), ("vits", "bob"), ("xtts_v2", "Ana Florence"),
                ("xtts-clone", "voices/reference.wav")} <= {(v["model"], v["id"]) for v in listed}
        eleven_voices = httpx.get(f"{router.url}/v1/voices", timeout=60).json()["voices"]
        assert {"alice", "bob", "Ana Florence"} <= {v["voice_id"] for v in eleven_voices}


def test_streamed_pieces_leave_the_router_with_the_chunk_s_characters_timed(worker, setup, tmp_path):
    """A chunk's pieces leave the router as they come, and its characters are spread over all of
    its audio, as for a chunk made at once."""
    env = {"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"coqui={worker}"}
    text = "hello world"
    with chorus_server(setup["models"], tmp_path / "router.log", configs_dir=setup["configs"],
                       env=env) as router:
        with httpx.stream("POST", f"{router.url}/v1/text-to-speech/narrator/stream/with-timestamps",
                          params={"output_format": "pcm_24000"}, timeout=120,
                          json={"text": text, "model_id": "xtts-stream", "language_code": "en"}) as response:
            assert response.status_code == 200, response.read()
            lines = [json.loads(line) for line in response.iter_lines() if line]
    audio = [base64.b64decode(line["audio_base64"]) for line in lines if line.get("audio_base64")]
    assert len(audio) > 1
    alignments = [line["alignment"] for line in lines if line.get("alignment")]
    assert "".join(c for alignment in alignments for c in alignment["characters"]) == text
    seconds = len(b"".join(audio)) / 2 / 24000
    assert alignments[-1]["character_end_times_seconds"][-1] == pytest.approx(seconds, abs=1e-3)


# --- a voice a user uploads, cloned by XTTS ---------------------------------------------------


def test_an_uploaded_voice_is_cloned_through_every_family(worker, setup, tmp_path):
    """The ElevenLabs SDK uploads a recording to the router, which keeps it in the models
    directory the worker shares; each family speaks it with the tiny XTTS; the SDK deletes it."""
    from elevenlabs.client import ElevenLabs
    from websockets.sync.client import connect

    env = {"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"coqui={worker}"}
    with chorus_server(setup["models"], tmp_path / "router.log", configs_dir=setup["configs"],
                       env=env) as router:
        client = ElevenLabs(base_url=router.url, api_key="x", timeout=120)
        recording = encoded_voice(4.0, rate=44100, fmt="mp3")
        voice_id = client.voices.ivc.create(name="Uploaded", files=[("me.mp3", recording, "audio/mpeg")]).voice_id
        folder = setup["models"] / "voices" / voice_id
        try:
            cloned = [v for v in client.voices.get_all().voices if v.voice_id == voice_id]
            assert [v.category for v in cloned] == ["cloned"]
            assert "xtts-clone" in cloned[0].high_quality_base_model_ids
            audio = b"".join(client.text_to_speech.convert(voice_id, text="hello there", model_id="xtts-clone",
                                                            language_code="en", output_format="mp3_44100_128"))
            assert decode(audio).codec in MP3 and decode(audio).duration > 0.1
            # Encoded once, kept beside the recording for every worker after this one.
            assert list(folder.glob("xtts-latents-*.pt"))

            openai = httpx.post(f"{router.url}/v1/audio/speech", timeout=120, json={
                "model": "xtts-clone", "input": "hello", "voice": {"id": voice_id}, "response_format": "wav"})
            assert openai.status_code == 200, openai.text
            assert audio_seconds(openai.content) > 0.1
            localai = httpx.post(f"{router.url}/tts", timeout=120, json={
                "model": "xtts-clone", "input": "hello", "voice": voice_id, "language": "en"})
            assert localai.status_code == 200, localai.text
            assert audio_seconds(localai.content) > 0.1
            # ElevenLabs' WebSocket, the voice in its path.
            query = "model_id=xtts-clone&language_code=en&output_format=pcm_24000"
            with connect(f"ws://127.0.0.1:{router.port}/v1/text-to-speech/{voice_id}/stream-input?{query}") as socket:
                for text in (" ", "hello there. ", ""):
                    socket.send(json.dumps({"text": text}))
                messages = [json.loads(message) for message in socket]
            pcm = b"".join(base64.b64decode(m["audio"]) for m in messages if m.get("audio"))
            assert messages[-1].get("isFinal") and len(pcm) > 2400

            # A LocalAI profile kept for one model: another is refused before any synthesis.
            profile = httpx.post(f"{router.url}/api/voice-profiles", timeout=60, files={"audio": ("me.mp3", recording)},
                                 data={"name": "Kept", "consent": "true", "models": "xtts-clone"}).json()
            refused = httpx.post(f"{router.url}/tts", timeout=60, json={
                "model": "xtts_v2", "input": "hello", "voice": profile["uri"], "language": "en"})
            assert refused.status_code == 400 and "models that can: xtts-clone" in refused.text
            assert httpx.delete(f"{router.url}/api/voice-profiles/{profile['id']}", timeout=60).status_code == 200
        finally:
            assert client.voices.delete(voice_id).status == "ok"
        assert not folder.exists()
