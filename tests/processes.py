"""Starting what the tests talk to over HTTP: a process (`chorus serve`, a backend worker) or an
app in a thread of the test process, on a free loopback port, ready once a URL answers 200, and
stopped afterwards whatever happens."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import uvicorn

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, *, log: Path, timeout: float, name: str,
                     verify: ssl.SSLContext | bool = True) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            # trust_env=False: a proxy in the environment must not stand between us and loopback.
            response = httpx.get(url, timeout=2, trust_env=False, verify=verify)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} was not ready ({url}) after {timeout} s, last answer: {last}:\n"
                f"{log.read_text(errors='replace')}"
            )
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """Terminate, and kill what does not stop within 15 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running(command: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path, ready_url: str,
            timeout: float, name: str, verify: ssl.SSLContext | bool = True) -> Iterator[subprocess.Popen]:
    """`command` with its output in `log`, ready (`ready_url` is 200, its certificate checked
    against `verify`) when this yields."""
    with log.open("wb") as sink:
        process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, ready_url, log=log, timeout=timeout, name=name, verify=verify)
        yield process
    finally:
        stop(process)


def chorus_command(*args: str) -> list[str]:
    """The `chorus` console script installed beside this interpreter, else its module."""
    script = Path(sys.executable).with_name("chorus")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "router.cli", *args]


@dataclass
class Server:
    port: int
    configs_dir: Path
    models_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def chorus_server(models_dir: Path, log: Path, configs_dir: Path = CONFIGS, env: Mapping[str, str] | None = None,
                  timeout: float = 120) -> Iterator[Server]:
    """`chorus serve` as a user starts it, ready (GET /readyz is 200) when this yields."""
    server = Server(free_port(), configs_dir, models_dir, log)
    with running(
        chorus_command("serve", "--configs", str(configs_dir), "--models", str(models_dir), "--log-level", "warning"),
        # The port last: `make test` exports PORT, and an inherited one must not win.
        env={**os.environ, **(env or {}), "HOST": "127.0.0.1", "PORT": str(server.port)},
        cwd=REPO, log=log, ready_url=f"{server.url}/readyz", timeout=timeout, name="chorus serve",
    ):
        yield server


@contextmanager
def backend_worker(python: Path, backend: str, configs: Path, models: Path, log: Path, *,
                   env: Mapping[str, str] | None = None, cwd: Path = REPO, args: Sequence[str] = (),
                   timeout: float = 300) -> Iterator[str]:
    """`python -m functions.worker` for `backend`, ready (GET /healthz is 200) when this yields
    its URL. `env` is added to this process's environment."""
    port = free_port()
    environment = {
        **os.environ, **(env or {}), "CHORUS_BACKEND": backend, "CHORUS_CONFIGS_DIR": str(configs),
        "CHORUS_MODELS_DIR": str(models), "HOST": "127.0.0.1", "PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    with running([str(python), "-m", "functions.worker", *args], env=environment, cwd=cwd, log=log,
                 ready_url=f"{url}/healthz", timeout=timeout, name=f"the {backend} worker"):
        yield url


@contextmanager
def serving(app: object, *, ready_path: str = "/readyz", port: int | None = None, timeout: float = 60,
            log_level: str = "warning") -> Iterator[str]:
    """`app` served by real uvicorn in a thread of this process; yields its URL once `ready_path`
    answers 200."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the in-process server did not become ready ({url}{ready_path})")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def unavailable(message: str) -> NoReturn:
    """What a test needs is missing: a skip on a developer's machine, a failure in CI (CI=true),
    which must run everything."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
