"""What the worker hop of http mode costs over local mode, on real processes over loopback.

    python bench/http_mode.py [--requests 60]

Starts a local-mode router, and an http-mode router in front of a Piper worker (the way
infra/compose.yaml wires them), then prints:
- the median latency of a one-sentence WAV request in each mode, taken in alternation so that
  both see the same machine load, and the median of the paired differences (target: < 10 ms);
- the time to the first audio byte for a 2,000-character text, straight from the worker, and
  through each router.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.processes import free_port, running  # noqa: E402  (the tests' way to start a server)

SENTENCE = "The quick brown fox jumps over the lazy dog."
PARAGRAPH = (
    "Chorus turns text into speech and streams the audio while it is still being made. "
    "Each backend runs in its own container, and the router reaches it over a small protocol. "
)
LONG_TEXT = (PARAGRAPH * 12)[:2000]
SETTLE_SECONDS = 2.0
CONFIG = {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx", "language": "en"}}


def process(command: list[str], env: dict[str, str], ready_url: str, log: Path):
    return running(command, env={**os.environ, **env}, cwd=REPO, log=log, ready_url=ready_url,
                   timeout=120, name=" ".join(command[2:4]))


def timed_request(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{url}/tts", json={"model": "tts-1", "input": SENTENCE, "response_format": "wav"})
    response.raise_for_status()
    return time.perf_counter() - started


def first_byte(client: httpx.Client, method_url: str, payload: dict) -> float:
    started = time.perf_counter()
    with client.stream("POST", method_url, json=payload) as response:
        response.raise_for_status()
        next(response.iter_raw())
        elapsed = time.perf_counter() - started
    # Leaving early stops the synthesis at the next chunk; let the one in progress finish so
    # it does not slow the next measurement.
    time.sleep(SETTLE_SECONDS)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="timed requests per mode (default: 60)")
    parser.add_argument("--ttfb", type=int, default=11, help="first-byte measurements per path (default: 11)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    from functions.piper import install_bundled_voice

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        models = Path(tmp) / "models"
        install_bundled_voice(models)
        common = {"CHORUS_CONFIGS_DIR": str(REPO / "configs"), "CHORUS_MODELS_DIR": str(models), "HOST": "127.0.0.1"}
        worker_port, local_port, http_port = free_port(), free_port(), free_port()
        worker = f"http://127.0.0.1:{worker_port}"
        local = f"http://127.0.0.1:{local_port}"
        http = f"http://127.0.0.1:{http_port}"
        python = sys.executable
        stack.enter_context(process(
            [python, "-m", "functions.worker"],
            {**common, "CHORUS_BACKEND": "piper", "PORT": str(worker_port)},
            f"{worker}/healthz", Path(tmp) / "worker.log",
        ))
        stack.enter_context(process(
            [python, "-m", "router.cli", "serve", "--log-level", "warning"],
            {**common, "CHORUS_MODE": "local", "PORT": str(local_port)},
            f"{local}/readyz", Path(tmp) / "local.log",
        ))
        stack.enter_context(process(
            [python, "-m", "router.cli", "serve", "--log-level", "warning"],
            {**common, "CHORUS_MODE": "http", "PORT": str(http_port), "CHORUS_BACKEND_URLS": f"piper={worker}"},
            f"{http}/readyz", Path(tmp) / "http.log",
        ))
        client = stack.enter_context(httpx.Client(timeout=120, trust_env=False))
        for _ in range(args.warmup):
            timed_request(client, local)
            timed_request(client, http)
        local_times, http_times = [], []
        for n in range(args.requests):
            # Alternate which goes first, so neither mode always follows the other.
            order = (local, http) if n % 2 == 0 else (http, local)
            for url in order:
                (local_times if url == local else http_times).append(timed_request(client, url))
        paired = [h - lo for h, lo in zip(http_times, local_times, strict=True)]

        ttfb = {"worker": [], "http router": [], "local router": []}
        for _ in range(args.ttfb):
            ttfb["worker"].append(first_byte(client, f"{worker}/synthesize", {"config": CONFIG, "request": {"model": "tts-1", "text": LONG_TEXT}}))
            for name, url in (("http router", http), ("local router", local)):
                ttfb[name].append(first_byte(client, f"{url}/v1/audio/speech", {"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": "pcm"}))

    ms = 1000
    print(f"one-sentence WAV request ({len(SENTENCE)} characters), {args.requests} each, alternating:")
    print(f"  local mode   median {statistics.median(local_times) * ms:7.1f} ms")
    print(f"  http mode    median {statistics.median(http_times) * ms:7.1f} ms")
    print(f"  added by the worker hop: median of paired differences {statistics.median(paired) * ms:+.1f} ms "
          f"(difference of medians {(statistics.median(http_times) - statistics.median(local_times)) * ms:+.1f} ms; "
          f"target < 10 ms)")
    print(f"time to first audio byte, {len(LONG_TEXT)}-character text (median of {args.ttfb}):")
    for name, values in ttfb.items():
        print(f"  {name:13s} {statistics.median(values) * ms:7.1f} ms")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
