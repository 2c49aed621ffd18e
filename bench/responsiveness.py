"""What the tests no longer time: the figures behind the wall-clock bounds they used to assert,
each printed against a baseline measured in the same run.

    python bench/responsiveness.py [--runs 5] [--burst 10] [--no-pull]

The app is served by uvicorn in a thread of this process, as the tests serve it (tests/_live.py),
in local mode: the bundled Piper voice behind the tests' ScriptedRunner, which can hang a chunk on
cue; model tts-1 takes 2 requests at a time with 2 more queued, and its deploy.timeout is 2 s.

  (a) /healthz latency (p50, p99, and p99 against idle): idle, the baseline; while one
      2,000-character text is synthesised; while a burst of --burst requests at once overloads
      the model (most are refused with 429 at once, 4 are served). The tests only assert that
      /healthz answers 200 meanwhile.
  (b) the synthesis cache: a hit against the miss that made it (medians of --runs).
  (c) a hung backend: the time to its 504 against the model's deploy.timeout; what exceeds the
      timeout is the router's own reaction.
  (d) `chorus models pull` with the network blocked: the time to its message, against
      huggingface_hub's own download of the same file (which retries a lost connection for tens
      of seconds), both in subprocesses. --no-pull skips it (the baseline alone takes ~25 s).

Elsewhere: a long text's first audio byte against its last, bench/speech.py (b); the first
sentence of text written word by word, bench/streamed_text.py. Figures compare only within one
run on one machine; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests._live import HANG, ScriptedRunner, live_app, piper_setup  # noqa: E402  (the tests' way to serve the app)
from tests.modal_offline import NO_NETWORK  # noqa: E402

SPEECH = "/v1/audio/speech"
TIMEOUT = 2.0
LONG_TEXT = " ".join(f"Sentence number {i} is here to make the text long enough to stream." for i in range(1, 31))
WORDS = ["river", "lantern", "copper", "meadow", "thunder", "violet", "harbor", "pepper", "falcon", "orchard"]


def sentence(n: int) -> str:
    """A sentence no other request of the run asks for: the cache never answers it."""
    picked = [WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(4)]
    return f"Request {n} speaks of the {picked[0]} and the {picked[1]}, then a {picked[2]} by the {picked[3]}."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def body(text: str) -> dict:
    return {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}


def probe_while(url: str, busy: threading.Event | None, count: int | None = None) -> list[float]:
    """/healthz latencies, one probe every 20 ms: `count` of them, or as long as `busy` is set."""
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while (busy is not None and busy.is_set()) or (count is not None and len(times) < count):
            start = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.02)
    return times


def during(url: str, work) -> tuple[list[float], object]:
    """/healthz latencies while `work()` runs in another thread, and what it returned."""
    busy = threading.Event()
    busy.set()

    def run():
        try:
            return work()
        finally:
            busy.clear()

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(run)
        times = probe_while(url, busy)
        return times, result.result()


def health_line(name: str, times: list[float], idle_p99: float | None) -> str:
    line = (f"    {name:<22} p50 {percentile(times, 50) * 1000:6.1f} ms, p99 {percentile(times, 99) * 1000:6.1f} ms"
            f" over {len(times)} probes")
    if idle_p99:
        line += f", p99 {percentile(times, 99) / idle_p99:.1f}x idle"
    return line


def burst(url: str, clients: int, first: int) -> list[int]:
    def ask(n: int) -> int:
        return httpx.post(f"{url}{SPEECH}", json=body(sentence(n)), timeout=120).status_code

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(ask, range(first, first + clients)))


def timed_post(client: httpx.Client, text: str) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.post(SPEECH, json=body(text))
    return time.perf_counter() - start, response


def pull_seconds(work: Path, code: list[str]) -> tuple[float, str]:
    """Seconds a Python command takes with the network blocked, and its last line of stderr."""
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", HF_HOME=str(work / "hf"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines() or ["(nothing on stderr)"]
    return time.perf_counter() - start, lines[-1][:120]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--no-pull", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chorus-responsiveness-"))
    configs, models = piper_setup(work, max_concurrent_inputs=2, timeout=TIMEOUT)
    runner = ScriptedRunner(models)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    with live_app(configs, models, runner, max_queue=2, queue_timeout=60, cache_dir=work / "cache") as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        timed_post(client, sentence(0))  # warm-up

        print("(a) /healthz")
        idle = probe_while(url, None, count=100)
        idle_p99 = percentile(idle, 99)
        print(health_line("idle", idle, None))
        long_times, long_response = during(url, lambda: client.post(SPEECH, json=body(LONG_TEXT)))
        assert long_response.status_code == 200, long_response.text
        print(health_line("during a long text", long_times, idle_p99))
        burst_times, codes = during(url, lambda: burst(url, args.burst, first=1000))
        print(health_line(f"during a burst of {args.burst}", burst_times, idle_p99))
        print(f"    the burst: {codes.count(200)} served, {codes.count(429)} refused with 429, "
              f"{len(codes) - codes.count(200) - codes.count(429)} other")

        misses, hits = [], []
        for run in range(args.runs):
            text = sentence(2000 + run)
            miss, made = timed_post(client, text)
            hit, again = timed_post(client, text)
            assert (made.headers["x-chorus-cache"], again.headers["x-chorus-cache"]) == ("miss", "hit")
            misses.append(miss)
            hits.append(hit)
        miss, hit = statistics.median(misses), statistics.median(hits)
        print(f"(b) cache: miss median {miss * 1000:.0f} ms, hit median {hit * 1000:.1f} ms ({miss / hit:.0f}x faster)")

        waits = []
        for run in range(max(1, args.runs // 2)):
            runner.release.clear()
            waited, response = timed_post(client, f"{HANG} number {run}. This never speaks.")
            assert response.status_code == 504, response.text
            waits.append(waited)
            runner.release.set()  # the hung chunk's thread goes, and the model's place with it
            runner.wait_idle()
        waited = statistics.median(waits)
        print(f"(c) a hung backend: 504 after {waited:.2f} s (median of {len(waits)}), deploy.timeout {TIMEOUT:g} s: "
              f"{waited / TIMEOUT:.2f}x, {(waited - TIMEOUT) * 1000:.0f} ms past it")

    if not args.no_pull:
        voice = "en_US-lessac-medium.onnx"
        ours, said = pull_seconds(work, ["-m", "router.cli", "models", "pull", voice, "--models", str(work / "pulled")])
        theirs, raised = pull_seconds(work, ["-c", (
            "import huggingface_hub; huggingface_hub.hf_hub_download('rhasspy/piper-voices', "
            f"'en/en_US/lessac/medium/{voice}', local_dir={str(work / 'hub')!r})")])
        print(f"(d) offline: chorus models pull {ours:.1f} s ({said})")
        print(f"    huggingface_hub's download alone {theirs:.1f} s ({raised}): pull takes {ours / theirs:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
