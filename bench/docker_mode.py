"""Docker mode on this host's Docker engine: what a cold start costs, and what a warm request adds.

    python bench/docker_mode.py [--cold 5] [--requests 60]

Needs a running engine and the Piper image (`make images`). Starts `chorus serve` in docker mode,
and prints:
- cold start to the first audio byte of a one-sentence request to Piper (median of --cold, each
  after the idle worker was stopped), split into the container's start, the worker's loading until
  ready, and the rest (the request's synthesis), from the router's own /metrics (target: <= 3 s);
- a warm one-sentence request in docker mode against http mode in front of a worker container of
  the same image, taken in alternation (target: at most 5 ms added).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import docker
import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.processes import chorus_server  # noqa: E402  (the tests' way to start a server)

SENTENCE = "The quick brown fox jumps over the lazy dog."
PROJECT = f"chorus-bench-{os.getpid()}"


def first_byte(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    body = {"model": "tts-1", "input": SENTENCE, "response_format": "wav"}
    with client.stream("POST", f"{url}/tts", json=body) as response:
        response.raise_for_status()
        chunks = response.iter_raw()
        next(chunks)
        elapsed = time.perf_counter() - started
        for _ in chunks:
            pass
    return elapsed


def whole(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    client.post(f"{url}/tts", json={"model": "tts-1", "input": SENTENCE, "response_format": "wav"}).raise_for_status()
    return time.perf_counter() - started


def phase_sums(client: httpx.Client, url: str) -> dict[str, float]:
    text = client.get(f"{url}/metrics").text
    pattern = r'chorus_cold_start_seconds_sum\{backend="piper",phase="(\w+)"\} ([0-9.e+-]+)'
    return {phase: float(value) for phase, value in re.findall(pattern, text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", type=int, default=5, help="cold starts measured (default: 5)")
    parser.add_argument("--requests", type=int, default=60, help="warm requests per mode (default: 60)")
    args = parser.parse_args()
    engine = docker.from_env()

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        configs, models = Path(tmp) / "configs", Path(tmp) / "models"
        configs.mkdir()
        models.mkdir()
        models.chmod(0o777)
        config = {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"},
                  "deploy": {"scaledown_window": 2}}
        (configs / "tts-1.yaml").write_text(yaml.safe_dump(config))
        env = {"CHORUS_MODE": "docker", "CHORUS_DOCKER_PROJECT": PROJECT, "CHORUS_DOCKER_NETWORK": PROJECT}
        # Last, once every container on it is gone.
        stack.callback(lambda: [network.remove() for network in engine.networks.list(names=[PROJECT])])
        server = stack.enter_context(chorus_server(models, Path(tmp) / "docker.log", configs, env=env))
        client = stack.enter_context(httpx.Client(timeout=120, trust_env=False))
        running = {"label": [f"chorus.project={PROJECT}"]}

        cold, container, ready = [], [], []
        for _ in range(args.cold):
            while engine.containers.list(filters=running):
                time.sleep(0.2)
            before = phase_sums(client, server.url)
            cold.append(first_byte(client, server.url))
            after = phase_sums(client, server.url)
            container.append(after["container"] - before.get("container", 0.0))
            ready.append(after["ready"] - before.get("ready", 0.0))

        # Warm: the docker-mode worker stays up (a request every few ms), and an http-mode router
        # talks to a second container of the same image on the same network.
        worker = engine.containers.run(
            "chorus/piper", detach=True, network=PROJECT, labels={"chorus.project": PROJECT},
            volumes={str(configs): {"bind": "/app/configs", "mode": "ro"}, str(models): {"bind": "/models", "mode": "rw"}},
            environment={"HOST": "0.0.0.0", "PORT": "9000"},
        )
        stack.callback(worker.remove, force=True)
        worker.reload()
        worker_url = f"http://{worker.attrs['NetworkSettings']['Networks'][PROJECT]['IPAddress']}:9000"
        http = stack.enter_context(chorus_server(models, Path(tmp) / "http.log", configs,
                                                 env={"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"piper={worker_url}"}))
        for _ in range(5):
            whole(client, server.url)
            whole(client, http.url)
        docker_times, http_times = [], []
        for n in range(args.requests):
            order = (server.url, http.url) if n % 2 == 0 else (http.url, server.url)
            for url in order:
                (docker_times if url == server.url else http_times).append(whole(client, url))
        paired = [d - h for d, h in zip(docker_times, http_times, strict=True)]

    ms = 1000
    median = statistics.median
    print(f"cold start to first audio byte, one sentence to Piper (median of {args.cold}):")
    print(f"  total            {median(cold) * ms:7.0f} ms (target <= 3000)")
    print(f"  container start  {median(container) * ms:7.0f} ms")
    print(f"  model load       {median(ready) * ms:7.0f} ms (until the worker's /healthz is ready)")
    print(f"  synthesis        {median([c - a - b for c, a, b in zip(cold, container, ready, strict=True)]) * ms:7.0f} ms "
          "(the rest: the request itself)")
    print(f"warm one-sentence WAV request, {args.requests} each, alternating:")
    print(f"  http mode    median {median(http_times) * ms:7.1f} ms")
    print(f"  docker mode  median {median(docker_times) * ms:7.1f} ms")
    print(f"  added by docker mode: median of paired differences {median(paired) * ms:+.1f} ms (target <= 5 ms)")


if __name__ == "__main__":
    main()
