"""Text written as an LLM writes it: how soon the first sentence is heard.

    python bench/streamed_text.py [--runs 7] [--every 0.05]

Feeds the speech service (local mode, in this process, the bundled Piper voice) a text one word
every `--every` seconds, and prints the median time from the moment the first sentence's last
word is handed over to the first audio byte, against Piper's own time for that sentence, called
directly in the same run (target: at most Piper's time plus 30 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from functions.config import ModelConfig  # noqa: E402
from functions.piper import PiperBackend, install_bundled_voice  # noqa: E402
from functions.protocol import SynthesisRequest  # noqa: E402
from router.registry import ModelRegistry  # noqa: E402
from router.runners.local import InProcessRunner  # noqa: E402
from router.settings import Settings  # noqa: E402
from router.speech import Ask, SpeechService  # noqa: E402

FIRST = "The first sentence is written one word at a time."
TEXT = f"{FIRST} Then a second one follows, as a language model would go on writing it."


async def first_audio_after_first_sentence(service: SpeechService, every: float) -> float:
    first_words = len(FIRST.split(" "))
    ended: list[float] = []

    async def words():
        for number, word in enumerate(TEXT.split(" "), 1):
            await asyncio.sleep(every)
            if number == first_words:
                ended.append(time.perf_counter())
            yield word + " "

    job = service.prepare(Ask(text=words(), text_param="text", model=None, family="elevenlabs"))
    stream = await service.pcm(job)
    first = await anext(stream.audio)
    heard = time.perf_counter()
    assert first
    async for _ in stream.audio:
        pass
    return heard - ended[0]


async def measure(runs: int, every: float) -> tuple[float, float]:
    models = Path(tempfile.mkdtemp(prefix="chorus-bench-stream-"))
    voice = install_bundled_voice(models)
    config = ModelConfig(name="tts-1", backend="piper", parameters={"model": voice.name})
    direct = PiperBackend(config, models)
    direct.load()

    def piper_first_chunk() -> float:
        started = time.perf_counter()
        next(iter(direct.synthesize(SynthesisRequest(model="tts-1", text=FIRST))))
        return time.perf_counter() - started

    runner = InProcessRunner(models)
    registry = ModelRegistry([config], models)
    await runner.start(registry.all())
    service = SpeechService(registry, runner, Settings(models_dir=models))
    piper_first_chunk()
    await first_audio_after_first_sentence(service, every)  # warm-up
    piper, streamed = [], []
    for _ in range(runs):
        piper.append(piper_first_chunk())
        streamed.append(await first_audio_after_first_sentence(service, every))
    await runner.close()
    return statistics.median(piper), statistics.median(streamed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between words (default: 0.05)")
    args = parser.parse_args()
    piper, streamed = asyncio.run(measure(args.runs, args.every))
    print(f"Piper, the first sentence called directly:         {piper * 1000:6.1f} ms")
    print(f"end of the first sentence's text -> first audio:   {streamed * 1000:6.1f} ms "
          f"(Piper + {(streamed - piper) * 1000:.1f} ms; target: at most + 30 ms)")


if __name__ == "__main__":
    main()
