"""Memory under mixed traffic: does the server give back what a busy spell took?

    python bench/memory.py [--minutes 30] [--idle 60] [--clients 3] [--seed 1] [--server-env NAME=VALUE ...]

Starts `chorus serve` as a user does (local mode, the repo's configs, an empty models directory
into which the bundled Piper voice is copied, the Wyoming port open) and drives it for
`--minutes` with `--clients` concurrent clients, each picking its next request at random (first
every scenario once, in turn, so that even `--minutes 2` goes through every front door and the
long inputs):
  - OpenAI POST /v1/audio/speech: mp3, wav, pcm, opus, and the sse stream_format;
  - ElevenLabs POST /v1/text-to-speech/{voice} and /stream/with-timestamps (JSON lines);
  - LocalAI POST /tts;
  - ElevenLabs' multi-stream-input WebSocket: text written word by word with flushes, a reply
    barged in on (a second close_context while it is being spoken), a client that leaves
    mid-audio, and a 3,000-character text with no punctuation at all written word by word;
  - Wyoming (the `wyoming` package's AsyncTcpClient): describe, synthesize, and a streamed
    synthesize-start/-chunk/-stop.
Texts run from one sentence to near the 4,096-character limit, some of those with no
punctuation (the chunker then cuts them every 250 characters, the longest input Piper gets).

The server process's resident memory (RSS, from /proc) is sampled every `--every` seconds
throughout. Printed: a line per tenth of the run (RSS then, peak so far, requests so far); then
RSS at the start (after the first request), its peak, right after the traffic, and after
`--idle` seconds with no request; the server's threads; requests done and errors per door, with
the first errors' messages. `--server-env` passes settings to the server only (MALLOC_ARENA_MAX=2,
CHORUS_MEMORY_RELEASE_SECONDS=0...), to compare one run against another. The figures depend on the
machine (its cores: onnxruntime's and glibc's per-thread memory) and on the random mix: compare
runs made on the same machine with the same --seed, --clients and --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this file's folder leads sys.path, where wyoming.py would shadow the package.
sys.path[:] = [str(ROOT), *(entry for entry in sys.path if Path(entry or ".").resolve() != HERE)]
import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice  # noqa: E402

from tests.processes import CONFIGS, chorus_command, free_port, running  # noqa: E402

VOICE = "en_US-joe-medium"
WYOMING_VOICE = f"tts-1:{VOICE}"
MB = 1024 * 1024
WORDS = ["river", "lantern", "copper", "meadow", "thunder", "violet", "harbor", "pepper", "falcon", "orchard",
         "marble", "winter", "garden", "silver", "morning", "planet", "window", "candle", "forest", "yellow",
         "bridge", "engine", "letter", "summer"]
#: The longest input every route takes by default (CHORUS_MAX_INPUT_CHARS).
LIMIT = 4096


class Texts:
    """Varied texts (no two alike, so a cache would never answer), from a seeded generator."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def words(self, count: int) -> list[str]:
        return [self.rng.choice(WORDS) for _ in range(count)]

    def sentence(self) -> str:
        words = self.words(self.rng.randint(6, 16))
        return " ".join(words).capitalize() + self.rng.choice((".", ".", "!", "?"))

    def sentences(self, count: int) -> str:
        return " ".join(self.sentence() for _ in range(count))

    def long(self, chars: int = LIMIT - 96) -> str:
        """Near the limit, in sentences."""
        text = ""
        while len(text) < chars - 120:
            text += self.sentence() + " "
        return text.strip()

    def unpunctuated(self, chars: int = LIMIT - 96) -> str:
        """Near the limit, one run of words with no punctuation at all."""
        words: list[str] = []
        while sum(len(word) + 1 for word in words) < chars - 12:
            words.append(self.rng.choice(WORDS))
        return " ".join(words)

    def any(self) -> str:
        """Mostly short, sometimes long: a long one in eight, half of those unpunctuated."""
        roll = self.rng.random()
        if roll < 0.0625:
            return self.long()
        if roll < 0.125:
            return self.unpunctuated()
        if roll < 0.55:
            return self.sentence()
        return self.sentences(self.rng.randint(2, 8))


class Server:
    def __init__(self, url: str, wyoming_port: int, pid: int):
        self.url, self.wyoming_port, self.pid = url, wyoming_port, pid
        self.ws_url = url.replace("http://", "ws://")


class ServerError(RuntimeError):
    """The server answered with an error where audio was due."""


# --- the front doors ---------------------------------------------------------------------------------


async def openai(server: Server, client: httpx.AsyncClient, texts: Texts, fmt: str | None = None) -> None:
    fmt = fmt or texts.rng.choice(("mp3", "wav", "pcm", "opus", "sse"))
    body = {"model": "tts-1", "input": texts.any(), "voice": "alloy",
            "response_format": "mp3" if fmt == "sse" else fmt}
    if fmt == "sse":
        body["stream_format"] = "sse"
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        await _audio(response, at_least=100)


async def elevenlabs(server: Server, client: httpx.AsyncClient, texts: Texts, timestamps: bool | None = None) -> None:
    timestamps = texts.rng.random() < 0.5 if timestamps is None else timestamps
    fmt = texts.rng.choice(("mp3_44100_128", "pcm_22050", "opus_48000_64"))
    path = f"/v1/text-to-speech/{VOICE}" + ("/stream/with-timestamps" if timestamps else "")
    async with client.stream("POST", path, params={"output_format": fmt}, json={"text": texts.any()}) as response:
        if not timestamps:
            await _audio(response, at_least=100)
            return
        if response.status_code != 200:
            raise ServerError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        audio = 0
        async for line in response.aiter_lines():
            if line.strip():
                audio += len(base64.b64decode(json.loads(line)["audio_base64"] or ""))
        if audio < 100:
            raise ServerError("no audio in the JSON lines")


async def localai(server: Server, client: httpx.AsyncClient, texts: Texts) -> None:
    body = {"model": "tts-1", "input": texts.any(), "response_format": texts.rng.choice(("wav", "mp3", "opus"))}
    async with client.stream("POST", "/tts", json=body) as response:
        await _audio(response, at_least=100)


async def _audio(response: httpx.Response, at_least: int) -> None:
    if response.status_code != 200:
        raise ServerError(f"{response.status_code}: {(await response.aread())[:200]!r}")
    size = 0
    async for data in response.aiter_bytes():
        size += len(data)
    if size < at_least:
        raise ServerError(f"only {size} bytes of audio")


async def websocket(server: Server, client: httpx.AsyncClient, texts: Texts, kind: str | None = None) -> None:
    """multi-stream-input: `reply` (word by word, flushes, close_context), `barge-in` (a reply,
    then a second close_context while it is spoken, then another reply on the socket),
    `leave` (the client drops the connection mid-audio), `unpunctuated` (3,000 characters with no
    punctuation, word by word)."""
    kind = kind or texts.rng.choice(("reply", "reply", "barge-in", "leave", "unpunctuated"))
    fmt = texts.rng.choice(("mp3_44100_128", "pcm_22050", "opus_48000_64"))
    url = f"{server.ws_url}/v1/text-to-speech/{VOICE}/multi-stream-input?output_format={fmt}"
    async with connect(url, proxy=None, max_size=None, compression=None, open_timeout=30) as socket:

        async def send(context: str, **message: object) -> None:
            await socket.send(json.dumps({"context_id": context, **message}))

        async def write(context: str, text: str, flush_every: int = 0) -> None:
            await send(context, text=" ")
            for number, word in enumerate(text.split(" "), 1):
                await send(context, text=word + " ")
                if flush_every and number % flush_every == 0:
                    await send(context, text="", flush=True)
                if number % 8 == 0:
                    await asyncio.sleep(0.01)  # a language model's pace, roughly
            await send(context, text="", flush=True)

        async def until(context: str, first_audio: bool = False) -> int:
            """Read to `context`'s isFinal (or its first audio); the audio bytes read."""
            audio = 0
            while True:
                message = json.loads(await asyncio.wait_for(socket.recv(), 300))
                if "error" in message:
                    if message.get("error") == "context_not_found":
                        continue  # a second close_context that came after the end: no barge-in
                    raise ServerError(f"socket error: {message}")
                if message.get("contextId") != context:
                    continue
                if message.get("audio"):
                    audio += len(base64.b64decode(message["audio"]))
                    if first_audio:
                        return audio
                if message.get("isFinal"):
                    return audio

        if kind == "unpunctuated":
            await write("long", texts.unpunctuated(3000))
            await send("long", close_context=True)
            if await until("long") < 100:
                raise ServerError("no audio for the unpunctuated text")
        elif kind == "reply":
            for turn in range(texts.rng.randint(1, 3)):
                context = f"turn-{turn}"
                await write(context, texts.sentences(texts.rng.randint(1, 6)), flush_every=texts.rng.choice((0, 12)))
                await send(context, close_context=True)
                if await until(context) < 100:
                    raise ServerError(f"no audio for {context}")
        elif kind == "barge-in":
            await write("barged", texts.sentences(8))
            await send("barged", close_context=True)  # after an empty flush: the reply is to finish
            await until("barged", first_audio=True)
            await send("barged", close_context=True)  # while it is spoken: the barge-in
            await until("barged")
            await write("next", texts.sentence())
            await send("next", close_context=True)
            if await until("next") < 100:
                raise ServerError("no audio after the barge-in")
        elif kind == "leave":
            await write("left", texts.sentences(10))
            await until("left", first_audio=True)
            # Gone mid-audio without a closing handshake, as a dropped network connection.
            socket.transport.abort()
            return
        with contextlib.suppress(Exception):
            await socket.send(json.dumps({"close_socket": True}))


async def wyoming(server: Server, client: httpx.AsyncClient, texts: Texts, kind: str | None = None) -> None:
    kind = kind or texts.rng.choice(("describe", "synthesize", "synthesize", "streamed", "streamed"))
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as tcp:
        voice = SynthesizeVoice(name=WYOMING_VOICE)
        if kind == "describe":
            await tcp.write_event(Describe().event())
            await _wyoming_until(tcp, "info")
            return
        text = texts.any()
        if kind == "synthesize":
            await tcp.write_event(Synthesize(text=text, voice=voice).event())
            last = "audio-stop"
        else:
            await tcp.write_event(SynthesizeStart(voice=voice).event())
            for word in text.split(" "):
                await tcp.write_event(SynthesizeChunk(text=word + " ").event())
            await tcp.write_event(Synthesize(text=text, voice=voice).event())
            await tcp.write_event(SynthesizeStop().event())
            last = "synthesize-stopped"
        if await _wyoming_until(tcp, last) < 100:
            raise ServerError("no audio over Wyoming")


async def _wyoming_until(tcp: AsyncTcpClient, last: str) -> int:
    audio = 0
    while True:
        event = await asyncio.wait_for(tcp.read_event(), 300)
        if event is None or event.type == "error":
            raise ServerError(f"Wyoming answered {event}")
        if event.type == "audio-chunk":
            audio += len(event.payload or b"")
        if event.type == last:
            return audio


Scenario = Callable[[Server, httpx.AsyncClient, Texts], Awaitable[None]]
#: door -> (weight, scenario)
DOORS: dict[str, tuple[int, Scenario]] = {
    "openai": (4, openai),
    "elevenlabs": (2, elevenlabs),
    "localai": (1, localai),
    "websocket": (3, websocket),
    "wyoming": (2, wyoming),
}


def tour() -> list[tuple[str, Scenario]]:
    """Every scenario once, the long inputs among them, for the start of the run."""

    def long(scenario: Callable[..., Awaitable[None]], make: str, **options: object) -> Scenario:
        async def run(server: Server, client: httpx.AsyncClient, texts: Texts) -> None:
            original = texts.any
            texts.any = getattr(texts, make)  # type: ignore[method-assign]
            try:
                await scenario(server, client, texts, **options)
            finally:
                texts.any = original  # type: ignore[method-assign]
        return run

    def fixed(scenario: Callable[..., Awaitable[None]], **options: object) -> Scenario:
        return lambda server, client, texts: scenario(server, client, texts, **options)

    return [
        ("websocket", fixed(websocket, kind="unpunctuated")),
        ("openai", long(openai, "unpunctuated", fmt="pcm")),
        ("wyoming", fixed(wyoming, kind="describe")),
        *(("openai", fixed(openai, fmt=fmt)) for fmt in ("mp3", "wav", "opus", "sse")),
        ("elevenlabs", fixed(elevenlabs, timestamps=False)),
        ("elevenlabs", long(elevenlabs, "long", timestamps=True)),
        ("localai", fixed(localai)),
        *(("websocket", fixed(websocket, kind=kind)) for kind in ("reply", "barge-in", "leave")),
        ("wyoming", fixed(wyoming, kind="synthesize")),
        ("wyoming", long(wyoming, "unpunctuated", kind="streamed")),
    ]


# --- measuring -----------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """The process's resident memory in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Sampler:
    """The server's RSS every `every` seconds, in a task: the peak, and the latest."""

    def __init__(self, pid: int, every: float):
        self.pid, self.every = pid, every
        self.peak = self.last = rss(pid)

    def sample(self) -> int:
        self.last = rss(self.pid)
        self.peak = max(self.peak, self.last)
        return self.last

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)


class Tally:
    def __init__(self) -> None:
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.messages: dict[str, list[str]] = defaultdict(list)

    def total(self) -> int:
        return sum(self.done.values()) + sum(self.errors.values())


async def drive(server: Server, args: argparse.Namespace) -> None:
    sampler = Sampler(server.pid, args.every)
    tally = Tally()
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, trust_env=False) as client:
        await openai(server, client, Texts(random.Random(0)), fmt="mp3")  # the first request: the start figure
        start = sampler.sample()
        print(f"RSS at the start (after the first request): {start / MB:7.0f} MB")
        sampling = asyncio.create_task(sampler.run())
        started = time.monotonic()
        deadline = started + args.minutes * 60
        pending = tour()
        population = list(DOORS)
        weights = [DOORS[door][0] for door in population]

        async def client_loop(number: int) -> None:
            texts = Texts(random.Random(rng.random()))
            while time.monotonic() < deadline:
                if pending:
                    door, scenario = pending.pop(0)
                else:
                    door = texts.rng.choices(population, weights)[0]
                    scenario = DOORS[door][1]
                try:
                    await scenario(server, client, texts)
                except Exception as exc:  # noqa: BLE001 - every failure is a figure here
                    tally.errors[door] += 1
                    if len(tally.messages[door]) < 3:
                        tally.messages[door].append(f"{type(exc).__name__}: {str(exc)[:160]}")
                else:
                    tally.done[door] += 1

        async def progress() -> None:
            step = args.minutes * 60 / 10
            print("   time   RSS MB  peak MB  requests")
            for tenth in range(1, 11):
                await asyncio.sleep(max(0.0, started + tenth * step - time.monotonic()))
                minutes, seconds = divmod(int(time.monotonic() - started), 60)
                print(f"  {minutes:3d}:{seconds:02d}  {sampler.sample() / MB:7.0f}  {sampler.peak / MB:7.0f}  "
                      f"{tally.total():8d}", flush=True)

        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(client_loop(number) for number in range(args.clients)))
        reporter.cancel()
        traffic = time.monotonic() - started
        after = sampler.sample()
        await asyncio.sleep(args.idle)
        idle = sampler.sample()
        sampling.cancel()

    print(f"RSS: start {start / MB:.0f} MB, peak {sampler.peak / MB:.0f} MB, after the traffic "
          f"({traffic / 60:.1f} min) {after / MB:.0f} MB, after {args.idle:g} s idle {idle / MB:.0f} MB; "
          f"server threads {threads(server.pid)}")
    print("requests per door (done, errors):")
    for door in DOORS:
        print(f"  {door:11} {tally.done[door]:5d} {tally.errors[door]:3d}")
        for message in tally.messages[door]:
            print(f"      {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="minutes of traffic (default: 30)")
    parser.add_argument("--idle", type=float, default=60, help="seconds with no request after it (default: 60)")
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients (default: 3)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between RSS samples (default: 0.5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server alone (repeatable)")
    args = parser.parse_args()

    from functions.piper import install_bundled_voice  # noqa: F401  (fails early where Piper is missing)

    work = Path(tempfile.mkdtemp(prefix="chorus-bench-memory-"))
    models = work / "models"
    models.mkdir()  # empty: the bundled voice is copied in on load
    port, wyoming_port = free_port(), free_port()
    extra = dict(item.split("=", 1) for item in args.server_env)
    env = {**os.environ, **extra, "HOST": "127.0.0.1", "PORT": str(port),
           # Every client is served, not refused.
           "CHORUS_MAX_QUEUE": str(max(16, args.clients * 2)), "CHORUS_QUEUE_TIMEOUT": "600"}
    command = chorus_command("serve", "--configs", str(CONFIGS), "--models", str(models),
                             "--wyoming-port", str(wyoming_port), "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    print(f"chorus serve (local mode, the bundled Piper voice), {os.cpu_count()} CPU cores, {args.clients} clients "
          f"for {args.minutes:g} min, then {args.idle:g} s idle, seed {args.seed}"
          + (f", server env {' '.join(args.server_env)}" if args.server_env else ""))
    with running(command, env=env, cwd=ROOT, log=work / "server.log", ready_url=f"{url}/readyz",
                 timeout=180, name="chorus serve") as process:
        asyncio.run(drive(Server(url, wyoming_port, process.pid), args))
        if process.poll() is not None:
            print(f"the server exited with {process.returncode}: see {work / 'server.log'}")


if __name__ == "__main__":
    main()
