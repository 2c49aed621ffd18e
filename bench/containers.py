"""What the containers cost: image sizes, build times, compose start-up, and the latency of the
router and Piper containers against local mode, in the same run.

    python bench/containers.py [--no-cache] [--images router piper ...] [--requests 40]

Needs a Docker engine (infra/docker-engine.sh start). Prints:
- each image's build time (with --no-cache: from an empty layer cache, downloads included; else
  with the cache as it is) and its size;
- `docker compose up --wait` of the default stack to healthy;
- the median latency of a one-sentence WAV request through the router container and the Piper
  container, and through a local-mode `chorus serve`, taken in alternation so that both see the
  same machine load, and their ratio (target: at most 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.containers import COMPOSE_FILE, compose_binary, compose_environment  # noqa: E402
from tests.processes import chorus_command, free_port, running  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
ALL_IMAGES = ["router", "piper", "bark", "transformers-musicgen", "parler-tts", "coqui", "vall-e-x"]


def compose(*args: str, env: dict[str, str], project: str | None = None) -> None:
    command = [compose_binary(), *(["-p", project] if project else []), "-f", str(COMPOSE_FILE), *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def image_size_mb(tag: str) -> float:
    info = json.loads(subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=True).stdout)
    return info[0]["Size"] / 1e6


def timed_request(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{url}/tts", json={"model": "tts-1", "input": SENTENCE, "response_format": "wav"})
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["router", "piper"], choices=ALL_IMAGES)
    parser.add_argument("--no-cache", action="store_true", help="build from an empty layer cache")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per mode (default: 40)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    env = compose_environment()

    print("image                   build s    size MB")
    for image in args.images:
        started = time.perf_counter()
        compose("--profile", "gpu", "build", *(["--no-cache"] if args.no_cache else []), image, env=env)
        print(f"{image:<22} {time.perf_counter() - started:8.1f} {image_size_mb(f'chorus/{image}'):10.0f}")

    project, port = f"chorus-bench-{uuid.uuid4().hex[:8]}", free_port()
    stack_env = {**env, "CHORUS_PORT": str(port)}
    started = time.perf_counter()
    compose("up", "-d", "--wait", env=stack_env, project=project)
    print(f"compose up --wait (router + Piper) to healthy: {time.perf_counter() - started:.1f} s")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            models, local_port = Path(tmp) / "models", free_port()
            models.mkdir()
            local = f"http://127.0.0.1:{local_port}"
            serve_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(local_port)}
            with running(chorus_command("serve", "--models", str(models), "--log-level", "warning"), env=serve_env,
                         cwd=REPO, log=Path(tmp) / "serve.log", ready_url=f"{local}/readyz", timeout=120,
                         name="chorus serve"), httpx.Client(timeout=60, trust_env=False) as client:
                containers = f"http://127.0.0.1:{port}"
                for _ in range(args.warmup):
                    timed_request(client, containers)
                    timed_request(client, local)
                seen: dict[str, list[float]] = {"containers": [], "local": []}
                for _ in range(args.requests):
                    seen["containers"].append(timed_request(client, containers))
                    seen["local"].append(timed_request(client, local))
        medians = {mode: statistics.median(times) * 1000 for mode, times in seen.items()}
        print(f"one-sentence WAV, median of {args.requests}: router + Piper containers "
              f"{medians['containers']:.1f} ms, local mode {medians['local']:.1f} ms, "
              f"ratio {medians['containers'] / medians['local']:.3f} (target <= 1.10)")
    finally:
        compose("down", "-v", env=stack_env, project=project)


if __name__ == "__main__":
    main()
