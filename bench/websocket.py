"""ElevenLabs' streaming WebSockets: how soon text written word by word is heard, and what eight
contexts on one socket get through.

    python bench/websocket.py [--runs 7] [--every 0.05] [--throughput-runs 3] [--sync-alignment] [--deflate]

Serves the app (local mode, the bundled Piper voice, deploy max_concurrent_inputs 8) by uvicorn
in a thread of this process and talks to it with the `websockets` client, output_format=pcm_22050
(so audio seconds = bytes / 2 / 22050) and auto_mode=true (a cut at each sentence's end), then
prints medians:
  (a) stream-input, a two-sentence text sent one word every `--every` seconds: the time from the
      moment the first sentence's last word is sent to the first audio message, against Piper's
      own time for that sentence (word times on, as the socket asks for them) called directly in
      this process half a second after the socket's last run (ONNX Runtime's threads spin a
      while after a run), the two taken in turn each run (target: at most Piper's time plus
      50 ms); and the time from the last word (sent with the closing {"text": ""}) to the
      server's isFinal;
  (b) multi-stream-input, a four-sentence text sent to each context all at once (to measure
      throughput rather than the writer's pace): audio seconds received per wall second, from
      the first text sent to the last context's isFinal, for one context alone and for eight
      contexts on one socket, taken in turn each run, and the ratio of the two (bounded by the
      CPU cores, whose count is printed);
  (c) a LiveKit turn, as its ElevenLabs plugin sends it (multi-stream-input, auto_mode and
      sync_alignment on, each sentence with flush, then an empty flush and close_context), at its
      default mp3_22050_32 and at pcm_22050, taken in turn each run: the time from the first
      sentence's text to its first audio message, and the MP3 turn's against the PCM one's
      (target: within 20 ms);
  (d) a barge-in on a reply already flushed and closed (thirty sentences), as Pipecat and LiveKit
      end every turn: a second close_context on its first audio, then the time to the last
      audio message and to isFinal (target: under 100 ms).
Per-message compression is off unless `--deflate`: the figures are the server's, not zlib's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from functions.config import ModelConfig  # noqa: E402
from functions.piper import PiperBackend  # noqa: E402
from functions.protocol import SynthesisRequest  # noqa: E402
from router.app import create_app  # noqa: E402
from router.settings import Settings  # noqa: E402
from tests._live import piper_setup  # noqa: E402  (the tests' configs and models directories)
from tests.processes import free_port, serving  # noqa: E402  (the tests' app-in-a-thread)

VOICE = "en_US-joe-medium"
RATE = 22050
#: Contexts that may synthesise at once: the model's deploy.max_concurrent_inputs.
CONTEXTS = 8
FIRST = "The first sentence is written one word at a time."
TEXT = f"{FIRST} Then a second one follows, as a language model would go on writing it."
LONG = (
    "Chorus turns text into speech for every client that speaks OpenAI, ElevenLabs or LocalAI. "
    "It splits long text into sentences and synthesises them one after another. "
    "The encoded audio is streamed while the rest is still being made. "
    "Several voices can share one socket, each in a context of its own."
)


class ServerError(RuntimeError):
    """The server sent an error message instead of audio."""


def audio_seconds(message: dict) -> float:
    return len(base64.b64decode(message["audio"])) / 2 / RATE if message.get("audio") else 0.0


async def receive(socket: ClientConnection) -> dict:
    message = json.loads(await socket.recv())
    if "error" in message:
        raise ServerError(message)
    return message


async def stream_input(url: str, every: float, options: dict) -> tuple[float, float]:
    """One socket fed TEXT word by word: (first sentence's end -> first audio message,
    last word -> isFinal), in seconds."""
    words = TEXT.split(" ")
    first_words = len(FIRST.split(" "))
    sent: dict[str, float] = {}
    async with connect(f"{url}/v1/text-to-speech/{VOICE}/stream-input?{options['query']}",
                       **options["connect"]) as socket:

        async def write() -> None:
            await socket.send(json.dumps({"text": " "}))
            for number, word in enumerate(words, 1):
                await asyncio.sleep(every)
                await socket.send(json.dumps({"text": word + " "}))
                if number == first_words:
                    sent["first"] = time.perf_counter()
            await socket.send(json.dumps({"text": ""}))
            sent["last"] = time.perf_counter()

        writer = asyncio.create_task(write())
        heard = final = None
        seconds = 0.0
        try:
            while final is None:
                message = await receive(socket)
                if message.get("audio") and heard is None:
                    heard = time.perf_counter()
                seconds += audio_seconds(message)
                if message.get("isFinal"):
                    final = time.perf_counter()
        finally:
            await writer
    if heard is None or seconds == 0:
        raise ServerError("no audio before isFinal")
    return heard - sent["first"], final - sent["last"]


async def multi_stream_input(url: str, contexts: int, options: dict) -> float:
    """LONG sent at once to each of `contexts` contexts on one socket: audio seconds per wall
    second, from the first text sent to the last isFinal."""
    ids = [f"context-{number}" for number in range(contexts)]
    async with connect(f"{url}/v1/text-to-speech/{VOICE}/multi-stream-input?{options['query']}",
                       **options["connect"]) as socket:
        started = time.perf_counter()
        for context in ids:
            for message in ({"text": " "}, {"text": LONG + " "}, {"text": "", "flush": True},
                            {"close_context": True}):
                await socket.send(json.dumps({**message, "context_id": context}))
        open_ = set(ids)
        seconds: dict[str, float] = dict.fromkeys(ids, 0.0)
        while open_:
            message = await receive(socket)
            seconds[message["contextId"]] += audio_seconds(message)
            if message.get("isFinal"):
                open_.discard(message["contextId"])
        wall = time.perf_counter() - started
        await socket.send(json.dumps({"close_socket": True}))
    if not all(seconds.values()):
        raise ServerError(f"a context had no audio: {seconds}")
    return sum(seconds.values()) / wall


#: A reply long enough to be interrupted: thirty sentences, over two minutes of speech.
REPLY = " ".join(f"This is sentence {n} of a long answer that the agent reads out to the caller." for n in range(30))


async def livekit_turn(url: str, output_format: str, options: dict) -> float:
    """One LiveKit turn of TEXT: seconds from the first sentence's text to its first audio."""
    query = f"output_format={output_format}&auto_mode=true&sync_alignment=true&inactivity_timeout=180"
    second = TEXT.removeprefix(FIRST).strip()
    async with connect(f"{url}/v1/text-to-speech/{VOICE}/multi-stream-input?{query}", **options["connect"]) as socket:
        await socket.send(json.dumps({"text": " ", "voice_settings": {}, "context_id": "turn"}))
        sent = time.perf_counter()
        await socket.send(json.dumps({"text": FIRST + " ", "flush": True, "context_id": "turn"}))
        for message in ({"text": second + " ", "flush": True}, {"text": "", "flush": True}, {"close_context": True}):
            await socket.send(json.dumps({**message, "context_id": "turn"}))
        heard = None
        while not (message := await receive(socket)).get("isFinal"):
            if message.get("audio") and heard is None:
                heard = time.perf_counter()
        await socket.send(json.dumps({"close_socket": True}))
    if heard is None:
        raise ServerError("no audio before isFinal")
    return heard - sent


async def barge_in(url: str, options: dict) -> tuple[float, float]:
    """REPLY flushed and closed, then interrupted on its first audio: seconds from the barge-in
    to the last audio message, and to isFinal."""
    query = f"output_format=pcm_{RATE}&auto_mode=true&sync_alignment=true"
    async with connect(f"{url}/v1/text-to-speech/{VOICE}/multi-stream-input?{query}", **options["connect"]) as socket:
        for message in ({"text": " "}, {"text": REPLY + " ", "flush": True}, {"text": "", "flush": True},
                        {"close_context": True}):
            await socket.send(json.dumps({**message, "context_id": "long"}))
        while not (await receive(socket)).get("audio"):
            pass
        barged = time.perf_counter()
        await socket.send(json.dumps({"close_context": True, "context_id": "long"}))
        last_audio = barged
        while not (message := await receive(socket)).get("isFinal"):
            if message.get("audio"):
                last_audio = time.perf_counter()
        final = time.perf_counter()
        await socket.send(json.dumps({"close_socket": True}))
    return last_audio - barged, final - barged


async def measure(url: str, direct: PiperBackend, args: argparse.Namespace) -> dict[str, float]:
    query = f"output_format=pcm_{RATE}&auto_mode=true&sync_alignment={str(args.sync_alignment).lower()}"
    options = {"query": query, "connect": {"proxy": None, "max_size": None,
                                           "compression": "deflate" if args.deflate else None}}

    def piper_first_sentence() -> float:
        request = SynthesisRequest(model="tts-1", text=FIRST, word_times=True)
        started = time.perf_counter()
        for piece in direct.synthesize(request):
            if isinstance(piece, bytes) and piece:
                break
        return time.perf_counter() - started

    piper_first_sentence()
    await stream_input(url, args.every, options)  # warm-up
    piper, heard, final = [], [], []
    for _ in range(args.runs):
        time.sleep(0.5)  # the server's ONNX Runtime threads may still spin after its last run
        piper.append(piper_first_sentence())
        first, last = await stream_input(url, args.every, options)
        heard.append(first)
        final.append(last)

    await multi_stream_input(url, 1, options)  # warm-up
    await multi_stream_input(url, CONTEXTS, options)
    alone, together = [], []
    for _ in range(args.throughput_runs):
        alone.append(await multi_stream_input(url, 1, options))
        together.append(await multi_stream_input(url, CONTEXTS, options))
    turns: dict[str, list[float]] = {"mp3_22050_32": [], f"pcm_{RATE}": []}
    await livekit_turn(url, "mp3_22050_32", options)  # warm-up
    for run in range(args.runs):
        # In turn, each first every other run.
        for output_format in sorted(turns, reverse=bool(run % 2)):
            turns[output_format].append(await livekit_turn(url, output_format, options))
    mp3, pcm = turns["mp3_22050_32"], turns[f"pcm_{RATE}"]
    last_audio, stopped = [], []
    for _ in range(args.runs):
        audio, final_message = await barge_in(url, options)
        last_audio.append(audio)
        stopped.append(final_message)
    return {"piper": statistics.median(piper), "heard": statistics.median(heard),
            "final": statistics.median(final), "alone": statistics.median(alone),
            "together": statistics.median(together), "mp3": statistics.median(mp3), "pcm": statistics.median(pcm),
            "last_audio": statistics.median(last_audio), "stopped": statistics.median(stopped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="stream-input runs (default: 7)")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between words (default: 0.05)")
    parser.add_argument("--throughput-runs", type=int, default=3, help="multi-stream-input runs (default: 3)")
    parser.add_argument("--sync-alignment", action="store_true", help="ask for sync_alignment=true")
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="chorus-bench-ws-"))
    configs, models = piper_setup(root, max_concurrent_inputs=CONTEXTS)
    port = free_port()
    settings = Settings(configs_dir=configs, models_dir=models, port=port)
    direct = PiperBackend(ModelConfig(name="tts-1", backend="piper", parameters={"model": f"{VOICE}.onnx"}), models)
    direct.load()
    with serving(create_app(settings), port=port) as url:
        figures = asyncio.run(measure(url.replace("http://", "ws://"), direct, args))

    piper, heard, final = figures["piper"], figures["heard"], figures["final"]
    alone, together = figures["alone"], figures["together"]
    print(f"deploy max_concurrent_inputs {CONTEXTS}, {os.cpu_count()} CPU cores, pcm_{RATE}, auto_mode=true, "
          f"sync_alignment={str(args.sync_alignment).lower()}, compression {'deflate' if args.deflate else 'off'}")
    print(f"(a) stream-input, one word every {args.every * 1000:.0f} ms, median of {args.runs}")
    print(f"    Piper, the first sentence called directly:        {piper * 1000:7.1f} ms")
    print(f"    end of the first sentence's text -> first audio:  {heard * 1000:7.1f} ms "
          f"(Piper {(heard - piper) * 1000:+.1f} ms; target: at most +50 ms)")
    print(f"    last text -> isFinal:                             {final * 1000:7.1f} ms")
    print(f"(b) multi-stream-input, {len(LONG)} characters sent at once to each context, "
          f"median of {args.throughput_runs} (taken in turn)")
    print(f"    1 context:  {alone:6.2f} audio s per wall s")
    print(f"    {CONTEXTS} contexts: {together:6.2f} audio s per wall s  ratio {together / alone:.2f} "
          f"({os.cpu_count()} CPU cores)")
    mp3, pcm = figures["mp3"], figures["pcm"]
    print(f"(c) a LiveKit turn (sentences with flush), median of {args.runs}: first sentence's text -> its first audio")
    print(f"    mp3_22050_32 (LiveKit's default): {mp3 * 1000:7.1f} ms")
    print(f"    pcm_{RATE}:                      {pcm * 1000:7.1f} ms  (MP3 {(mp3 - pcm) * 1000:+.1f} ms; "
          f"target: within 20 ms)")
    print(f"(d) barge-in on a flushed and closed reply, median of {args.runs}")
    print(f"    barge-in -> last audio message: {figures['last_audio'] * 1000:7.1f} ms (target: under 100 ms)")
    print(f"    barge-in -> isFinal:            {figures['stopped'] * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
