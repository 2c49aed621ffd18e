"""Wyoming benchmark: time from `synthesize` to the first `audio-chunk`, Chorus against wyoming-piper.

Starts, on loopback and in the same run, `chorus serve --wyoming-port` (local mode, the bundled
Piper voice en_US-joe-medium) and wyoming-piper 2.5 serving that same voice file, and calls Piper
in this process for the first sentence alone; then prints medians, the three taken in turn each
round:
  (a) a three-sentence `synthesize`: time to its first audio-chunk (target: at most Piper's
      first-sentence time plus 30 ms), and to its audio-stop;
  (b) the same text streamed (synthesize-start, a synthesize-chunk per word): time from the word
      that ends the first sentence to the first audio-chunk.

wyoming-piper pins its own piper-tts, so it runs from a virtual environment of its own:
    python3.11 -m venv /tmp/wyoming-piper-venv
    /tmp/wyoming-piper-venv/bin/pip install wyoming-piper==2.5.2
It then runs offline: the voice's two files are put in its --data-dir (it skips the MODEL_CARD it
would otherwise fetch) and its voice list ships in the wheel. Without it (--wyoming-piper missing)
Chorus and Piper are measured alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this file's folder leads sys.path and this file would shadow the wyoming package.
sys.path[:] = [str(ROOT), *(entry for entry in sys.path if Path(entry or ".").resolve() != HERE)]
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice  # noqa: E402

from tests.processes import free_port, running, stop  # noqa: E402  (the tests' way to start a server)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Home Assistant asked for the weather, and the answer came back at once.",
    "Every sentence after the first is made while the first one is playing.",
]
TEXT = " ".join(SENTENCES)
VOICE = "en_US-joe-medium"
DEFAULT_WYOMING_PIPER = Path("/tmp/wyoming-piper-venv/bin/python")

#: One measurement: (seconds to the first audio-chunk, seconds to the end of the answer).
Timing = tuple[float, float]


async def one_shot(port: int, voice: str) -> Timing:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        start = time.perf_counter()
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
        return await _until(client, start, "audio-stop")


async def streamed(port: int, voice: str) -> Timing:
    """The text a word at a time, as fast as it can be sent, the answer read all the while; timed
    from the word that ends the first sentence. (Words keep coming: wyoming-piper's sentence
    detector speaks a sentence only once the next one has begun.)"""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=voice)).event())
        start = time.perf_counter()
        answer = asyncio.create_task(_until(client, start, "synthesize-stopped"))
        first_words = len(SENTENCES[0].split())
        for number, word in enumerate(TEXT.split(), 1):
            await client.write_event(SynthesizeChunk(text=word + " ").event())
            if number == first_words:
                sent = time.perf_counter() - start
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
        await client.write_event(SynthesizeStop().event())
        first, end = await answer
        return first - sent, end - sent


async def _until(client: AsyncTcpClient, start: float, last: str) -> Timing:
    """Read to the event `last` (the whole answer, so that no synthesis outlives the round)."""
    first = None
    while True:
        event = await client.read_event()
        if event is None or event.type == "error":
            raise RuntimeError(f"the server answered {event}")
        if event.type == "audio-chunk" and first is None:
            first = time.perf_counter() - start
        if event.type == last:
            return first, time.perf_counter() - start


async def wait_for_wyoming(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the Wyoming server exited:\n{log.read_text(errors='replace')}")
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                if (event := await client.read_event()) is not None and event.type == "info":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Wyoming server on {port} was not ready:\n{log.read_text(errors='replace')}")
        await asyncio.sleep(0.2)


async def medians(contenders: dict[str, Callable[[], Awaitable[Timing]]], runs: int) -> dict[str, Timing]:
    """Each contender's median (first chunk, end), taken in turn each round after one warm-up,
    so that a machine whose speed drifts slows them all alike."""
    for measure in contenders.values():
        await measure()
    times: dict[str, list[Timing]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, measure in contenders.items():
            times[name].append(await measure())
    return {name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
            for name, values in times.items()}


async def bench(args: argparse.Namespace, chorus_port: int, piper_port: int | None) -> None:
    from anyio import to_thread

    from functions.config import ModelConfig
    from functions.piper import PiperBackend
    from functions.protocol import SynthesisRequest

    backend = PiperBackend(ModelConfig.model_validate(
        {"name": "tts-1", "backend": "piper", "parameters": {"model": f"{VOICE}.onnx"}}), args.models)
    backend.load()

    async def piper_first_sentence() -> Timing:
        start = time.perf_counter()
        await to_thread.run_sync(lambda: b"".join(backend.synthesize(SynthesisRequest(model="tts-1", text=SENTENCES[0]))))
        seconds = time.perf_counter() - start
        return seconds, seconds

    one = {"piper": piper_first_sentence, "chorus": lambda: one_shot(chorus_port, f"tts-1:{VOICE}")}
    streams = {"chorus": lambda: streamed(chorus_port, f"tts-1:{VOICE}")}
    if piper_port is not None:
        one["wyoming-piper"] = lambda: one_shot(piper_port, VOICE)
        streams["wyoming-piper"] = lambda: streamed(piper_port, VOICE)
    a = await medians(one, args.runs)
    b = await medians(streams, args.runs)
    piper = a["piper"][0]
    print(f"(a) synthesize, three sentences ({len(TEXT)} characters), median of {args.runs} (taken in turn)")
    print(f"    piper in process, first sentence alone {piper * 1000:7.1f} ms")
    for name in ("chorus", "wyoming-piper"):
        if name in a:
            first, end = a[name]
            print(f"    {name:13} first audio-chunk {first * 1000:7.1f} ms  ({(first - piper) * 1000:+6.1f} ms over "
                  f"piper; target <= +30)   audio-stop {end * 1000:7.1f} ms")
    if "wyoming-piper" in a:
        print(f"    chorus / wyoming-piper, first audio-chunk: {a['chorus'][0] / a['wyoming-piper'][0]:.3f}")
    print("(b) streamed a word per synthesize-chunk: from the first sentence's last word")
    for name, (first, end) in b.items():
        print(f"    {name:13} first audio-chunk {first * 1000:7.1f} ms   synthesize-stopped {end * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--wyoming-piper", type=Path, default=DEFAULT_WYOMING_PIPER, metavar="PYTHON",
                        help=f"the interpreter wyoming-piper 2.5 is installed for (default: {DEFAULT_WYOMING_PIPER})")
    args = parser.parse_args()

    from functions.piper import install_bundled_voice

    work = Path(tempfile.mkdtemp(prefix="chorus-bench-wyoming-"))
    args.models = work / "models"
    install_bundled_voice(args.models)
    configs = work / "configs"
    configs.mkdir()
    shutil.copy(ROOT / "configs" / "tts-1.yaml", configs)  # the bundled voice's config alone
    http_port, chorus_port = free_port(), free_port()
    env = {**os.environ, "CHORUS_MODELS_DIR": str(args.models), "CHORUS_CONFIGS_DIR": str(configs)}
    command = [sys.executable, "-m", "router.cli", "serve", "--port", str(http_port),
               "--wyoming-port", str(chorus_port), "--log-level", "warning"]
    with running(command, env=env, cwd=ROOT, log=work / "chorus.log", ready_url=f"http://127.0.0.1:{http_port}/readyz",
                 timeout=120, name="chorus serve"):
        piper_port = None
        process = None
        if args.wyoming_piper.exists():
            piper_port = free_port()
            log = work / "wyoming-piper.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [str(args.wyoming_piper), "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{piper_port}",
                     "--voice", VOICE, "--data-dir", str(args.models)],
                    stdout=sink, stderr=subprocess.STDOUT)
            asyncio.run(wait_for_wyoming(piper_port, process, log))
        else:
            print(f"wyoming-piper not found at {args.wyoming_piper}: Chorus and Piper alone (see --help to set it up)")
        try:
            asyncio.run(bench(args, chorus_port, piper_port))
        finally:
            if process is not None:
                stop(process)


if __name__ == "__main__":
    main()
