"""Core benchmark: what the router adds on top of Piper, streaming, and memory on long input.

Starts a real `chorus serve` (local mode) on loopback and, in this process, the same Piper voice
called directly, then prints medians and ratios:
  (a) one sentence through /v1/audio/speech as WAV and MP3 against Piper in process;
  (b) time to first audio byte for a 2,000-character text against the time to the full response;
  (c) the server's peak memory after a 50,000-character request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.processes import free_port, running  # noqa: E402  (the tests' way to start a server)

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank."
PARAGRAPH = (
    "Chorus turns text into speech for every client that speaks OpenAI, ElevenLabs or LocalAI. "
    "It splits long text into sentences, synthesises them one after another, and streams the "
    "encoded audio while the rest is still being made. "
)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def interleaved_medians(fns: dict, runs: int) -> dict[str, float]:
    """Each function's median time, the functions taken in turn each round, so that a machine
    whose speed drifts slows them all alike and their ratios stay fair."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    from functions.config import ModelConfig
    from functions.piper import PiperBackend, install_bundled_voice
    from functions.protocol import SynthesisRequest

    models = Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    install_bundled_voice(models)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "CHORUS_MODELS_DIR": str(models),
           "CHORUS_CONFIGS_DIR": str(ROOT / "configs"), "CHORUS_MAX_INPUT_CHARS": "60000"}
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "router.cli", "serve", "--log-level", "warning"]
    with (
        running(command, env=env, cwd=ROOT, log=models / "server.log", ready_url=f"{url}/readyz",
                timeout=120, name="chorus serve") as server,
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        backend = PiperBackend(ModelConfig.model_validate(
            {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"}}), models)
        backend.load()

        def speech(fmt: str, text: str = SENTENCE) -> bytes:
            response = client.post("/v1/audio/speech", json={
                "model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt})
            response.raise_for_status()
            return response.content

        medians = interleaved_medians({
            "direct": lambda: b"".join(backend.synthesize(SynthesisRequest(model="tts-1", text=SENTENCE))),
            "wav": lambda: speech("wav"),
            "mp3": lambda: speech("mp3"),
        }, args.runs)
        direct, wav, mp3 = medians["direct"], medians["wav"], medians["mp3"]
        print("(a) one sentence, median of", args.runs, "(the three taken in turn)")
        print(f"    piper in process {direct * 1000:7.1f} ms")
        print(f"    /v1/audio/speech wav {wav * 1000:7.1f} ms  ratio {wav / direct:.3f} (target <= 1.05)")
        print(f"    /v1/audio/speech mp3 {mp3 * 1000:7.1f} ms  ratio {mp3 / direct:.3f} (target <= 1.25)")

        long_text = (PARAGRAPH * 20)[:2000]
        firsts, totals = [], []
        for run in range(max(3, args.runs // 3) + 1):
            start = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/audio/speech", json={
                    "model": "tts-1", "voice": "alloy", "input": long_text, "response_format": "mp3"}) as response:
                for _ in response.iter_raw():
                    if first is None:
                        first = time.perf_counter() - start
            total = time.perf_counter() - start
            if run:  # the first run is a warm-up
                firsts.append(first)
                totals.append(total)
        ttfb, full = statistics.median(firsts), statistics.median(totals)
        print("(b) 2,000 characters, streamed mp3")
        print(f"    first byte {ttfb:.3f} s (target <= 0.35), full {full:.3f} s, "
              f"ratio {ttfb / full:.3f} (target <= 0.10)")

        before = peak_rss_mb(server.pid)
        huge = (PARAGRAPH * 300)[:50000]
        start = time.perf_counter()
        size = len(speech("mp3", huge))
        elapsed = time.perf_counter() - start
        print("(c) 50,000 characters, mp3")
        print(f"    {size / 1e6:.1f} MB of audio in {elapsed:.1f} s; server peak RSS "
              f"{before:.0f} MB before, {peak_rss_mb(server.pid):.0f} MB after (target < 600)")


if __name__ == "__main__":
    main()
