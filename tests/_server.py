"""What the front-door tests (playground, CLI, README) share: a real `chorus serve` on a free
loopback port, the `chorus` command line, and decoding audio with PyAV."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import httpx

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def chorus(*args: str) -> list[str]:
    """The `chorus` console script installed beside this interpreter, else its module."""
    script = Path(sys.executable).with_name("chorus")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "router.cli", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def chorus_server(models_dir: Path, log: Path, configs_dir: Path = CONFIGS, env: dict | None = None,
                  timeout: float = 120) -> Iterator[RunningServer]:
    """`chorus serve` as a user starts it, ready (GET /readyz is 200) when this yields, and
    stopped afterwards whatever happens."""
    port = free_port()
    environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **(env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            chorus("serve", "--configs", str(configs_dir), "--models", str(models_dir), "--log-level", "warning"),
            cwd=REPO, env=environment, stdout=sink, stderr=subprocess.STDOUT,
        )
    server = RunningServer(port, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"chorus serve exited with {process.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"chorus serve was not ready after {timeout} s:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def audio_seconds(data: bytes | Path) -> float:
    """Decode a whole audio file with PyAV and return its duration in seconds (0 if it holds
    no audio); fails if it does not decode."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate
