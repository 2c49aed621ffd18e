"""What the heavy-backend tests share: a tiny model built in the backend's own environment and
saved to a models directory, and that backend's worker (`python -m functions.worker`) serving it
on loopback, started the way its container starts it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from envs import ROOT, image_env

BUILDERS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_python(image: str) -> tuple[Path, float]:
    """The image's environment (built on first use, then cached) and the seconds it took here."""
    start = time.perf_counter()
    python = image_env(image)
    return python, time.perf_counter() - start


def build_tiny_model(python: Path, builder: str, folder: Path) -> float:
    """Run `tests/tiny_models/<builder>.py <folder>` in the backend's environment; its seconds."""
    start = time.perf_counter()
    subprocess.run(
        [str(python), str(BUILDERS / f"{builder}.py"), str(folder)],
        cwd=BUILDERS, check=True, capture_output=True, timeout=600,
    )
    return time.perf_counter() - start


def offline_env(**extra: str) -> dict[str, str]:
    """Nothing may come from a model hub: every load must find its files on disk."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@contextmanager
def worker(python: Path, backend: str, configs: Path, models: Path, log: Path,
           timeout: float = 300) -> Iterator[str]:
    """The backend's worker, ready (GET /healthz is 200) when this yields its URL; stopped after."""
    port = free_port()
    env = offline_env(
        CHORUS_BACKEND=backend, CHORUS_CONFIGS_DIR=str(configs), CHORUS_MODELS_DIR=str(models),
        HOST="127.0.0.1", PORT=str(port),
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(python), "-m", "functions.worker", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the {backend} worker exited:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {backend} worker was not ready:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def synthesize(url: str, config: dict, timeout: float = 300, **request: object) -> httpx.Response:
    return httpx.post(
        f"{url}/synthesize",
        json={"config": config, "request": {"model": config["name"], **request}},
        timeout=timeout,
    )
