"""Path traversal: model names, voice names and config paths that try to leave the models
directory (`..`, absolute paths, encoded forms, symlinks pointing out) are refused, and the
server opens no file outside it while refusing them (watched with Python's audit hook)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.config import ConfigError, UnsafePathError, resolve_in
from router.registry import ModelRegistry
from tests._live import assert_family_error, live_app, piper_setup, write_config

_opened: list[str] = []
_watching = threading.Event()


def _audit(event: str, args: tuple, watching: threading.Event = _watching, opened: list[str] = _opened) -> None:
    # The hook outlives the module (an audit hook cannot be removed): it keeps what it uses.
    if watching.is_set() and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("traversal")
    configs, models = piper_setup(root)
    secret = root / "secret"
    secret.mkdir()
    # A voice that looks real, outside the models directory, and links to it from inside.
    for suffix in (".onnx", ".onnx.json"):
        (secret / f"stolen{suffix}").write_bytes((models / f"en_US-joe-medium{suffix}").read_bytes())
        (models / f"link{suffix}").symlink_to(secret / f"stolen{suffix}")
    (models / "linkdir").symlink_to(secret, target_is_directory=True)
    return configs, models, secret


@pytest.fixture(scope="module")
def client(world) -> Iterator[httpx.Client]:
    configs, models, _ = world
    with live_app(configs, models) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


@pytest.fixture
def nothing_outside_read(world) -> Iterator[None]:
    _, _, secret = world
    _opened.clear()
    _watching.set()
    yield
    _watching.clear()
    leaked = [path for path in _opened if str(secret) in path or "/etc/" in path]
    assert leaked == [], f"opened outside the models directory: {leaked}"


HOSTILE = [
    "../secret/stolen.onnx",
    "../../../../etc/passwd",
    "/etc/passwd",
    "link.onnx",
    "linkdir/stolen.onnx",
    "%2e%2e/secret/stolen.onnx",
    "..%2Fsecret%2Fstolen.onnx",
    "..\\secret\\stolen.onnx",
    "./../secret/stolen.onnx",
    "en_US-joe-medium.onnx/../../secret/stolen.onnx",
    "stolen.onnx\x00.txt",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_model_names_are_refused(client, nothing_outside_read, name):
    # LocalAI takes a model file name when a backend is given: the one place a name is a path.
    response = client.post("/tts", json={"model": name, "backend": "piper", "input": "Hello."})
    assert response.status_code in (400, 404), response.text
    assert_family_error(response)
    for path, body in (
        ("/v1/audio/speech", {"model": name, "input": "Hello.", "voice": "alloy"}),
        ("/v1/text-to-speech/alloy", {"model_id": name, "text": "Hello."}),
    ):
        response = client.post(path, json=body)
        assert response.status_code in (400, 404), response.text
        assert_family_error(response)


@pytest.mark.parametrize("voice", HOSTILE)
def test_hostile_voice_names_are_refused(client, nothing_outside_read, voice):
    response = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hello.", "voice": voice})
    assert_family_error(response, 400)
    response = client.post("/tts", json={"input": "Hello.", "voice": voice})
    assert_family_error(response, 400)


@pytest.mark.parametrize(
    "voice_id", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "%2Fetc%2Fpasswd", "link.onnx"]
)
def test_hostile_voice_ids_in_the_url_are_refused(client, nothing_outside_read, voice_id):
    response = client.post(f"/v1/text-to-speech/{voice_id}", json={"text": "Hello."})
    assert response.status_code in (400, 404, 422), response.text
    assert_family_error(response)


@pytest.mark.parametrize(
    "path", ["/playground/static/..%2F..%2Fapp.py", "/playground/static/%2e%2e%2fapi%2fcommon.py", "/playground/../router/app.py"]
)
def test_static_files_cannot_traverse(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text


@pytest.mark.parametrize("model", HOSTILE[:5] + ["../models/../secret/stolen.onnx"])
def test_config_paths_that_escape_are_refused_at_start(world, tmp_path, model):
    _, models, _ = world
    configs = tmp_path / "configs"
    path = write_config(configs)
    path.write_text(path.read_text().replace("en_US-joe-medium.onnx", model))
    with pytest.raises(ConfigError, match="outside the models directory"):
        ModelRegistry.from_dir(configs, models)


@pytest.mark.parametrize("relative", HOSTILE)
def test_resolve_in_refuses_every_escape(world, relative):
    _, models, _ = world
    try:
        resolved = resolve_in(models, relative)
    except UnsafePathError:
        return
    # Encoded forms are plain (odd) names inside the directory, never decoded into an escape.
    assert models.resolve() in resolved.parents
    assert not resolved.exists()
