"""`chorus models pull`: what it fetches for each kind of name, and that with no network it
stops at once with a message saying so (nothing here reaches the hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from functions.config import ModelConfig
from router.pull import PullError, pull
from tests.modal_offline import NO_NETWORK
from tests.processes import REPO


def run_chorus(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`chorus models pull ARGS` with the network blocked; `blocked(tmp_path)` then lists the hosts
    it tried to reach, one line an attempt. (The subprocess timeout only turns a hang into a
    failure.)"""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK, encoding="utf-8")
    # No proxy either: every attempt then names the host it was for.
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    environment.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", HF_HOME=str(tmp_path / "hf"),
                       NO_NETWORK_LOG=str(tmp_path / "blocked.log"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "models", "pull", *args, "--models", str(tmp_path / "models")],
        check=False, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
    )


def blocked(tmp_path: Path) -> list[str]:
    log = tmp_path / "blocked.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


@pytest.mark.parametrize("name", ["suno/bark-small", "en_US-lessac-medium.onnx"])
def test_pull_fails_fast_and_clearly_when_offline(tmp_path, name):
    result = run_chorus(tmp_path, name)
    assert result.returncode != 0
    assert "Hugging Face hub cannot be reached" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Fast: one request to the hub (its name looked up at most twice), then the message. The
    # download functions alone retry attempt after attempt for about 25 s before giving up (timed
    # in bench/responsiveness.py).
    attempts = blocked(tmp_path)
    assert set(attempts) == {"huggingface.co"} and len(attempts) <= 2, attempts
    # Nothing half-fetched is left where the backends would look.
    assert not any((tmp_path / "models").glob("**/*.onnx"))


def test_pull_with_hf_hub_offline_set_says_so(tmp_path):
    result = run_chorus(tmp_path, "suno/bark-small", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "HF_HUB_OFFLINE" in result.stderr


def test_a_config_name_pulls_what_its_config_names(monkeypatch, tmp_path):
    """The config's parameters.model decides what is fetched and where it lands."""
    import huggingface_hub

    downloads: list[tuple[str, str]] = []

    class Api:
        def repo_info(self, repo_id, timeout=None):
            downloads.append(("info", repo_id))

    def hf_hub_download(repo_id, filename, local_dir):
        downloads.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"voice")
        return str(path)

    def snapshot_download(repo_id, local_dir):
        downloads.append((repo_id, str(local_dir)))
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models = tmp_path / "models"
    configs = {
        "lessac": ModelConfig(name="lessac", backend="piper", parameters={"model": "voices/en_US-lessac-medium.onnx"}),
        "bark": ModelConfig(name="bark", backend="bark", parameters={"model": "suno/bark-small"}),
    }

    assert pull("lessac", models, configs) == [models.resolve() / "voices" / "en_US-lessac-medium.onnx"]
    assert (models / "voices" / "en_US-lessac-medium.onnx").read_bytes() == b"voice"
    assert (models / "voices" / "en_US-lessac-medium.onnx.json").is_file()
    assert not (models / "voices" / ".pull").exists()
    assert ("rhasspy/piper-voices", "en/en_US/lessac/medium/en_US-lessac-medium.onnx") in downloads

    # A hub id lands in the models-directory folder of that name, where functions/hub.py looks.
    assert pull("bark", models, configs) == [models.resolve() / "suno" / "bark-small"]
    assert ("suno/bark-small", str(models.resolve() / "suno" / "bark-small")) in downloads


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tts_models/en/ljspeech/vits", "Coqui catalogue"),
        ("../../etc/passwd", "expected a config name"),
        ("just-a-word", "expected a config name"),
    ],
)
def test_names_that_cannot_be_pulled_are_refused_before_any_download(tmp_path, name, message):
    with pytest.raises(PullError, match=message):
        pull(name, tmp_path / "models")


def test_pull_kokoro_offline_names_both_files_and_leaves_nothing_behind(tmp_path):
    result = run_chorus(tmp_path, "kokoro")
    assert result.returncode != 0
    attempts = blocked(tmp_path)
    assert set(attempts) == {"github.com"} and len(attempts) <= 2, attempts  # the first file's request, once
    assert "kokoro-v1.0.onnx and voices-v1.0.bin in the models directory" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not any(path.is_file() for path in (tmp_path / "models").glob("**/*"))


def test_pull_kokoro_saves_both_files_under_the_configs_names(monkeypatch, tmp_path):
    import httpx

    asked: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(200, content=b"weights of " + request.url.path.rsplit("/", 1)[1].encode())

    client = httpx.Client(transport=httpx.MockTransport(serve))
    monkeypatch.setattr(httpx, "stream", lambda method, url, **options: client.stream(method, url))
    config = ModelConfig(name="kokoro", backend="kokoro", parameters={"model": "kokoro/model.onnx"})
    written = pull("kokoro", tmp_path, {"kokoro": config})
    assert written == [tmp_path / "kokoro" / "model.onnx", tmp_path / "kokoro" / "voices-v1.0.bin"]
    assert written[0].read_bytes() == b"weights of kokoro-v1.0.onnx"
    assert written[1].read_bytes() == b"weights of voices-v1.0.bin"
    assert all(url.startswith("https://github.com/thewh1teagle/kokoro-onnx/releases/download/") for url in asked)
