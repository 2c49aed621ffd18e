"""The voice library through its front doors, on a live server (Piper only: speaking a saved
voice with a cloning model is tests/test_coqui.py's): the ElevenLabs SDK adds, lists, edits and
deletes a voice made from recordings of every format; each bad upload is refused in the family's
shape and leaves nothing behind; a non-cloning model names the models that can; concurrent
creates keep the limit; with API keys a voice is its key's alone."""

from __future__ import annotations

import json
import os
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests._live import assert_family_error, live_app, piper_setup
from tests.audio import RECORDING_FORMATS, SHORT_TEXT, decode, encoded_voice

elevenlabs = pytest.importorskip("elevenlabs")
from websockets.sync.client import connect  # noqa: E402

MAX_VOICES = 4
UPLOAD_BYTES = 3 * 1024 * 1024
USER_KEYS = ["alice-key-0123", "bob-key-4567"]
ADMIN_KEY = "admin-key-8910"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return piper_setup(tmp_path_factory.mktemp("voices"))


@pytest.fixture(scope="module")
def url(setup) -> Iterator[str]:
    configs, models = setup
    with live_app(configs, models, max_voices=MAX_VOICES, max_voice_upload_bytes=UPLOAD_BYTES) as running:
        yield running


@pytest.fixture
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def saved(models: Path) -> list[str]:
    """What the library holds on disk, hidden folders included; consents are counted apart."""
    folder = models / "voices"
    return sorted(entry.name for entry in folder.iterdir() if entry.name != "consents") if folder.is_dir() else []


def add(http: httpx.Client, files: list[tuple[str, bytes]], headers: dict | None = None, **fields) -> httpx.Response:
    return http.post("/v1/voices/add", headers=headers, data={"name": "Narrator", **fields},
                     files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def test_the_elevenlabs_sdk_adds_lists_edits_and_deletes_a_voice(url, setup):
    from elevenlabs.client import ElevenLabs
    from elevenlabs.core import ApiError

    _, models = setup
    client = ElevenLabs(base_url=url, api_key="x", timeout=60)
    # One recording per format, 1.5 s each, a stereo one among them: 9 s in all.
    files = [(f"take.{fmt}", encoded_voice(1.5, fmt=fmt, stereo=fmt == "flac"), "audio/octet-stream")
             for fmt in RECORDING_FORMATS]
    added = client.voices.ivc.create(name="Grandpa", files=files, description="reads stories",
                                     labels={"accent": "scottish"})
    assert added.requires_verification is False
    try:
        listed = {voice.voice_id: voice for voice in client.voices.get_all().voices}
        assert listed[added.voice_id].category == "cloned"
        assert listed[added.voice_id].name == "Grandpa"
        assert "en_US-joe-medium" in listed  # the models' own voices stay listed
        voice = client.voices.get(added.voice_id)
        assert (voice.name, voice.labels, voice.description) == ("Grandpa", {"accent": "scottish"}, "reads stories")
        # The reference a backend reads: every file, mono, at the cloning rate.
        with wave.open(str(models / "voices" / added.voice_id / "reference.wav")) as reference:
            assert (reference.getnchannels(), reference.getframerate()) == (1, 24000)
            assert 8.9 < reference.getnframes() / 24000 < 9.3

        assert client.voices.update(added.voice_id, name="Grandad").status == "ok"
        assert client.voices.get(added.voice_id).name == "Grandad"
        assert client.voices.get(added.voice_id).labels == {"accent": "scottish"}  # kept as it was
    finally:
        assert client.voices.delete(added.voice_id).status == "ok"
    with pytest.raises(ApiError) as caught:
        client.voices.get(added.voice_id)
    assert caught.value.status_code == 404
    assert saved(models) == []


def test_a_long_recording_is_trimmed_to_what_cloning_reads(http, setup):
    _, models = setup
    response = add(http, [("long.mp3", encoded_voice(40, rate=16000, fmt="mp3"))])
    assert response.status_code == 200, response.text
    voice_id = response.json()["voice_id"]
    with wave.open(str(models / "voices" / voice_id / "reference.wav")) as reference:
        assert reference.getnframes() == 30 * 24000
    assert http.delete(f"/v1/voices/{voice_id}").status_code == 200


# (what is wrong, files, form fields, status)
BAD_UPLOADS = [
    ("no files", [], {}, 400),
    ("an empty file", [("a.wav", b"")], {}, 400),
    ("not audio", [("a.wav", b"this is not audio at all" * 40)], {}, 415),
    ("a truncated file", [("a.mp3", encoded_voice(3, fmt="mp3")[:120])], {}, 415),
    ("too short", [("a.wav", encoded_voice(0.5, rate=8000))], {}, 400),
    ("too long", [("a.flac", encoded_voice(301, rate=8000, fmt="flac"))], {}, 400),
    ("too large", [("a.wav", encoded_voice(40, rate=44100))], {}, 413),
    ("too many files", [(f"{n}.wav", encoded_voice(0.1, rate=8000)) for n in range(26)], {}, 400),
    ("a path for a file name", [("../../escape.wav", encoded_voice(2, rate=8000))], {}, 400),
    ("an empty name", [("a.wav", encoded_voice(2, rate=8000))], {"name": "  "}, 400),
    ("labels that are no object", [("a.wav", encoded_voice(2, rate=8000))], {"labels": "[1, 2]"}, 400),
]


@pytest.mark.parametrize("files, fields, status", [case[1:] for case in BAD_UPLOADS],
                         ids=[case[0] for case in BAD_UPLOADS])
def test_a_bad_upload_is_refused_and_changes_nothing(http, setup, files, fields, status):
    _, models = setup
    response = add(http, files, **fields)
    assert_family_error(response, status)
    assert saved(models) == []
    assert not any(v["category"] == "cloned" for v in http.get("/v1/voices").json()["voices"])


def test_a_model_that_cannot_clone_names_the_ones_that_can(http):
    voice_id = add(http, [("a.wav", encoded_voice(2, rate=16000))]).json()["voice_id"]
    try:
        eleven = http.post(f"/v1/text-to-speech/{voice_id}", json={"text": SHORT_TEXT, "model_id": "tts-1"})
        assert "cannot speak" in assert_family_error(eleven, 400)["message"]
        openai = http.post("/v1/audio/speech", json={"model": "tts-1", "input": SHORT_TEXT, "voice": voice_id})
        assert "models that can" in assert_family_error(openai, 400, param="voice")["message"]
    finally:
        http.delete(f"/v1/voices/{voice_id}")


def test_concurrent_creates_keep_the_limit_and_leave_no_half_voice(http, setup):
    _, models = setup
    recording = [("a.wav", encoded_voice(2, rate=16000))]
    with ThreadPoolExecutor(MAX_VOICES + 3) as pool:
        responses = list(pool.map(lambda _: add(http, recording), range(MAX_VOICES + 3)))
    made = [r.json()["voice_id"] for r in responses if r.status_code == 200]
    assert len(made) == MAX_VOICES
    for refused in (r for r in responses if r.status_code != 200):
        assert "at most 4 voices" in assert_family_error(refused, 400)["message"]
    assert saved(models) == sorted(made)
    with ThreadPoolExecutor(MAX_VOICES) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda v: http.delete(f"/v1/voices/{v}"), made))
    assert saved(models) == []


def test_a_voice_belongs_to_the_key_that_made_it(tmp_path):
    configs, models = piper_setup(tmp_path)
    alice, bob, admin = ({"xi-api-key": key} for key in (*USER_KEYS, ADMIN_KEY))
    with live_app(configs, models, api_keys=USER_KEYS, admin_api_keys=[ADMIN_KEY]) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        response = add(http, [("a.wav", encoded_voice(2, rate=16000))], headers=alice)
        assert response.status_code == 200, response.text
        voice_id = response.json()["voice_id"]

        def cloned(headers: dict) -> list[str]:
            voices = http.get("/v1/voices", headers=headers).json()["voices"]
            return [v["voice_id"] for v in voices if v["category"] == "cloned"]

        assert cloned(alice) == [voice_id] and cloned(admin) == [voice_id]
        assert cloned(bob) == []
        assert_family_error(http.get(f"/v1/voices/{voice_id}", headers=bob), 404)
        assert_family_error(http.delete(f"/v1/voices/{voice_id}", headers=bob), 404)
        assert_family_error(http.post(f"/v1/voices/{voice_id}/edit", headers=bob, data={"name": "Mine"}), 404)
        # To Bob it is no voice at all, as ElevenLabs answers an unknown voice_id.
        spoken = http.post(f"/v1/text-to-speech/{voice_id}", headers=bob, json={"text": SHORT_TEXT})
        assert_family_error(spoken, 404, code="voice_not_found")
        # Nor is its recording, named by its path in the models directory.
        for path in (f"voices/{voice_id}/reference.wav", f"./voices//{voice_id}/reference.wav"):
            by_path = http.post("/v1/audio/speech", headers=bob, json={"model": "tts-1", "input": SHORT_TEXT,
                                                                       "voice": path})
            assert_family_error(by_path, 404, code="voice_not_found", param="voice")
        assert http.get(f"/v1/voices/{voice_id}", headers=alice).status_code == 200

        def first_reply(key: str) -> dict:
            """What the socket answers a key sent only in its first message, as ElevenLabs documents."""
            address = f"{url.replace('http', 'ws', 1)}/v1/text-to-speech/{voice_id}/stream-input?model_id=tts-1"
            with connect(address) as socket:
                socket.send(json.dumps({"text": " ", "xi_api_key": key}))
                return json.loads(socket.recv(timeout=30))

        # Alice's key finds her voice, which Piper cannot speak; to Bob's it is no voice at all.
        assert "Narrator) is a cloned voice, which model 'tts-1' cannot speak" in first_reply(USER_KEYS[0])["message"]
        to_bob = first_reply(USER_KEYS[1])
        assert to_bob["error"] == "voice_not_found" and "cloned" not in to_bob["message"]
        assert http.delete(f"/v1/voices/{voice_id}", headers=admin).status_code == 200
        assert_family_error(http.get(f"/v1/voices/{voice_id}", headers=alice), 404)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder all the same")
def test_a_models_directory_that_cannot_be_written_is_a_503_naming_the_cause(tmp_path):
    configs, models = piper_setup(tmp_path)
    (models / "voices").mkdir()
    (models / "voices").chmod(0o555)
    try:
        with live_app(configs, models) as url, httpx.Client(base_url=url, timeout=60) as http:
            response = add(http, [("a.wav", encoded_voice(2, rate=16000))])
            message = assert_family_error(response, 503, code="storage_unavailable")["message"]
            assert message == "the models directory could not save the voice: Permission denied"
            assert not any(v["category"] == "cloned" for v in http.get("/v1/voices").json()["voices"])
        assert saved(models) == []
    finally:
        (models / "voices").chmod(0o755)


def test_the_openai_sdk_makes_a_custom_voice_from_a_consent_and_a_sample(url, setup):
    import openai

    _, models = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    consent = client.audio.voice_consents.create(name="Jo Doe", language="en-US",
                                                 recording=("consent.wav", encoded_voice(3), "audio/wav"))
    assert (consent.object, consent.language) == ("audio.voice_consent", "en-US")
    assert [c.id for c in client.audio.voice_consents.list()] == [consent.id]
    assert client.audio.voice_consents.retrieve(consent.id).name == "Jo Doe"

    with pytest.raises(openai.BadRequestError) as caught:  # OpenAI takes at most 30 s
        client.audio.voices.create(name="Jo", consent=consent.id,
                                   audio_sample=("long.mp3", encoded_voice(31, rate=16000, fmt="mp3"), "audio/mpeg"))
    assert caught.value.param == "audio_sample" and "30 s" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.voices.create(name="Jo", consent="cons_00000000000000000000",
                                   audio_sample=("jo.mp3", encoded_voice(5, fmt="mp3"), "audio/mpeg"))
    assert caught.value.param == "consent"

    voice = client.audio.voices.create(name="Jo", consent=consent.id,
                                       audio_sample=("jo.m4a", encoded_voice(5, fmt="m4a"), "audio/mp4"))
    assert (voice.object, voice.type, voice.name) == ("audio.voice", "audio_sample", "Jo")
    # The same voice in ElevenLabs' listing: one library behind every family.
    listed = httpx.get(f"{url}/v1/voices", timeout=60).json()["voices"]
    assert [v["name"] for v in listed if v["voice_id"] == voice.id] == ["Jo"]
    assert client.audio.voices.delete(voice.id).deleted
    assert client.audio.voice_consents.delete(consent.id).deleted
    assert saved(models) == [] and not any((models / "voices" / "consents").iterdir())
    client.close()


def test_localai_voice_profiles_keep_their_clip_and_name_it_by_uri(http, setup):
    _, models = setup
    clip = ("clip.ogg", encoded_voice(6, rate=48000, fmt="ogg"), "audio/ogg")
    refused = http.post("/api/voice-profiles", data={"name": "Ana"}, files={"audio": clip})
    assert "permission" in assert_family_error(refused, 400)["message"]
    refused = http.post("/api/voice-profiles", data={"name": "Ana", "consent": "true", "models": "tts-1"},
                        files={"audio": clip})
    assert "tts-1: no cloning model" in assert_family_error(refused, 400)["message"]
    created = http.post("/api/voice-profiles", data={"name": "Ana", "consent": "true", "transcript": "Hello there.",
                                                     "language": "en"}, files={"audio": clip})
    assert created.status_code == 200, created.text
    profile = created.json()
    assert profile["uri"] == f"localai://voice-profiles/{profile['id']}"
    assert [p["id"] for p in http.get("/api/voice-profiles").json()["profiles"]] == [profile["id"]]
    audio = decode(http.get(f"/api/voice-profiles/{profile['id']}/audio").content)
    assert (audio.container, audio.sample_rate) == ("wav", 24000) and 5.9 < audio.duration < 6.1
    # Piper cannot clone: the profile's URI is understood, and the models that can are named.
    spoken = http.post("/tts", json={"model": "tts-1", "input": "Hi.", "voice": profile["uri"]})
    assert "cloned voice" in assert_family_error(spoken, 400)["message"]
    assert http.delete(f"/api/voice-profiles/{profile['id']}").status_code == 200
    assert_family_error(http.get(f"/api/voice-profiles/{profile['id']}"), 404)
    assert saved(models) == []
