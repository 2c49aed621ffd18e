"""What the heavy-backend tests share: a tiny model built in the backend's own image and saved to a
models directory, and that backend's worker (`python -m functions.worker`, the image's command)
serving it on loopback from the same image."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.containers import image_python
from tests.processes import backend_worker

BUILDERS = Path(__file__).resolve().parent


def backend_python(image: str) -> tuple[Path, float]:
    """The image's `python` (the image built on first use) and the seconds that took here."""
    start = time.perf_counter()
    python = image_python(image)
    return python, time.perf_counter() - start


def build_tiny_model(python: Path, builder: str, folder: Path, *options: str) -> float:
    """Run `tests/tiny_models/<builder>.py <folder> [options]` with `python` (the backend's image's,
    or this one's for a builder that needs only `onnx`); its seconds."""
    start = time.perf_counter()
    subprocess.run(
        [str(python), str(BUILDERS / f"{builder}.py"), str(folder), *options],
        cwd=BUILDERS, check=True, capture_output=True, timeout=600,
    )
    return time.perf_counter() - start


#: Nothing may come from a model hub: every load must find its files on disk.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, **extra}


@contextmanager
def worker(python: Path, backend: str, configs: Path, models: Path, log: Path,
           timeout: float = 300) -> Iterator[str]:
    """The backend's worker, offline, ready (GET /healthz is 200) when this yields its URL; stopped after."""
    with backend_worker(python, backend, configs, models, log, env=OFFLINE, timeout=timeout,
                        args=("--log-level", "warning")) as url:
        yield url


@contextmanager
def tiny_worker(root: Path, image: str, builder: str, *configs: dict) -> Iterator[str]:
    """`image`'s worker, its tiny model built by `builder` at <root>/models/tiny-<builder>, and
    `configs` written, in the order given, to <root>/configs; yields the worker's URL."""
    models, configs_dir = root / "models", root / "configs"
    configs_dir.mkdir()
    python, _ = backend_python(image)
    build_tiny_model(python, builder, models / f"tiny-{builder}")
    for number, config in enumerate(configs):
        # Numbered: a router reading the folder takes the models in file-name order.
        (configs_dir / f"{number}-{config['name']}.yaml").write_text(yaml.safe_dump(config))
    with worker(python, image, configs_dir, models, root / "worker.log") as url:
        yield url


@contextmanager
def router(root: Path, backend: str, worker_url: str, *configs: dict) -> Iterator[str]:
    """`chorus serve` in http mode (as compose runs it) in front of `backend`'s worker, with
    `configs` as its configs; yields its URL."""
    from tests.processes import chorus_server

    configs_dir = root / "router-configs"
    configs_dir.mkdir()
    for config in configs:
        (configs_dir / f"{config['name']}.yaml").write_text(yaml.safe_dump(config))
    env = offline_env(CHORUS_MODE="http", CHORUS_BACKEND_URLS=f"{backend}={worker_url}")
    with chorus_server(root, root / "router.log", configs_dir, env=env) as server:
        yield server.url


def pcm(response: httpx.Response, rate: int) -> bytes:
    """A worker's /synthesize answer: 200, PCM at `rate`."""
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == str(rate)
    return response.content


def synthesize(url: str, config: dict, timeout: float = 300, **request: object) -> httpx.Response:
    return httpx.post(
        f"{url}/synthesize",
        json={"config": config, "request": {"model": config["name"], **request}},
        timeout=timeout,
    )


def concurrently(url: str, *requests: tuple[dict, dict]) -> list[httpx.Response]:
    """Each (config, request fields) sent to the worker at once, from threads of its own."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda sent: synthesize(url, sent[0], **sent[1]), requests))


def batches(url: str, model: str) -> tuple[int, int]:
    """The worker's generations for `model` and the chunks of text they took (GET /metrics)."""
    metrics = httpx.get(f"{url}/metrics").text

    def series(name: str) -> int:
        found = re.search(rf'^chorus_batch_size_{name}{{model="{re.escape(model)}"}} (\S+)$', metrics, re.M)
        return int(float(found[1])) if found else 0

    return series("count"), series("sum")


def batched(config: dict, name: str, size: int) -> dict:
    """`config` as `name`, taking `size` chunks a generation and waiting until it has them (ten
    seconds at most): what the tests send decides the batches, not how fast the machine is."""
    deploy = {"max_batch_size": size, "max_concurrent_inputs": size, "batch_wait_ms": 10_000}
    return {**config, "name": name, "deploy": deploy}
