"""What a Modal deploy does before and after a memory snapshot is restored, and how many
containers a listing, a request and a burst start, offline.

    python bench/modal_app.py [--no-heavy] [--burst 20]

Prints:
- for each backend with a tiny model, the seconds of its container's `snap=True` hook (imports
  and weights into host memory: done once, kept by the snapshot) and of its `snap=False` hook
  (moving the weights to the device: paid by every restored container; on a CPU-only machine
  nothing moves), and what a restore paid when the snapshot held the imports alone. Piper runs through the app's class in the fake Modal of the
  tests; the torch backends run the hooks' two calls (`create_backend(...).load()`, then
  `to_device()`) in their own images (needs a Docker engine; --no-heavy skips them);
- with the example configs and the fake Modal, the containers that a voice listing (target:
  zero), one request, and a burst of requests at once start, and what the burst got back, with
  tts-1's `max_containers` at 1 (its default) and at 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.modal_fake import FakeDict, FakeModal  # noqa: E402
from tests.modal_offline import load_app  # noqa: E402

warnings.filterwarnings("ignore", message="The .* function is executing locally")

#: Run in a backend's image: the two hooks' calls, timed, for a tiny model's config.
HOOKS = '''
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from functions import backend_class, create_backend
from functions.config import ModelConfig
from functions.protocol import SynthesisRequest
config = ModelConfig.model_validate(json.loads(sys.argv[1]))
backend_class(config.backend)
imported = time.perf_counter()
backend = create_backend(config, Path(sys.argv[2]))
backend.load()
loaded = time.perf_counter()
backend.to_device()
placed = time.perf_counter()
text = "Rain on a tin roof." if config.backend == "transformers-musicgen" else "Hello there, friend."
extra = {"duration_seconds": 0.5} if config.backend == "transformers-musicgen" else {}
request = SynthesisRequest(model=config.name, text=text, voice=config.tts.voice,
                           language=config.parameters.language, **extra)
pcm = b"".join(backend.synthesize(request))
print(json.dumps({"before": loaded - started, "import": imported - started, "after": placed - loaded,
                  "first": time.perf_counter() - placed,
                  "bytes": len(pcm)}))
'''


def piper_hooks(models: Path, runs: int) -> dict[str, float]:
    app = load_app(pytest.MonkeyPatch(), REPO / "configs", models)
    befores, afters = [], []
    for _ in range(runs):
        fake = FakeModal(app)
        instance = fake.lookup(app.APP_NAME, "PiperBackend")(model="tts-1")
        asyncio.run(_one_call(instance))
        (container,) = fake.started()
        befores.append(container.before_snapshot)
        afters.append(container.after_restore)
    return {"before": statistics.median(befores), "after": statistics.median(afters)}


async def _one_call(instance) -> None:
    call = await instance.synthesize.spawn.aio({"model": "tts-1", "text": "Hello there, friend."})
    await call.get.aio()


def heavy_hooks(root: Path) -> dict[str, dict[str, float]]:
    from tests.containers import image_python
    from tests.tiny_models.volume import HEAVY, place_tiny_models

    seed = root / "seed"
    place_tiny_models(seed)
    # Laid out for a container that mounts it at /models; here it is read where it lies.
    coqui_config = seed / "vits" / "config.json"
    coqui_config.write_text(coqui_config.read_text().replace("/models/", f"{seed}/"))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    figures = {}
    for backend, (config, _) in sorted(HEAVY.items()):
        env = {"HF_HOME": str(seed / "huggingface"), "TORCH_HOME": str(seed / "torch"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CHORUS_CACHE_DIR": str(root / "cache")}
        if backend == "vall-e-x":
            env["PYTHONPATH"] = str(seed / "test-hooks")  # the tiny architecture
        result = subprocess.run([str(image_python(backend)), "-c", HOOKS, json.dumps(config), str(seed)],
                                capture_output=True, text=True, timeout=900, env={**_base_env(), **env})
        if result.returncode != 0:
            raise SystemExit(f"{backend}: {result.stderr[-2000:]}")
        figures[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("CHORUS_", "HF_", "TORCH_", "PYTHONPATH"))}


def containers_started(models: Path, burst: int, max_containers: int) -> dict[str, object]:
    """Containers the fake Modal starts for a listing, one request and a burst, with the example
    configs (tts-1's max_containers set as given)."""
    from router.app import create_app
    from router.runners.modal import ModalRunner
    from router.settings import Settings

    configs = Path(tempfile.mkdtemp(prefix="chorus-configs-"))
    for path in (REPO / "configs").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if data["name"] == "tts-1":
            data["deploy"]["max_containers"] = max_containers
        (configs / path.name).write_text(yaml.safe_dump(data))
    app_module = load_app(pytest.MonkeyPatch(), configs, models)
    fake = FakeModal(app_module, cold_start=0.5)
    settings = Settings(mode="modal", configs_dir=configs, models_dir=models)
    app = create_app(settings, runner=ModalRunner(app_module.APP_NAME, lookup=fake.lookup, voices_dict=FakeDict()))
    body = {"model": "tts-1", "input": "Hello there, this is one request of many.", "voice": "alloy",
            "response_format": "wav"}

    async def scenario() -> dict[str, object]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://chorus", timeout=120
        ) as client:
            for path in ("/v1/audio/voices", "/v1/voices", "/v2/voices", "/"):
                await client.get(path)
            listing = len(fake.started())
            await client.post("/v1/audio/speech", json=body)
            request = len(fake.started()) - listing
            # A fresh model variant for the burst: the same model, from a router that just started.
            fake.containers.clear()
            answers = await asyncio.gather(*(client.post("/v1/audio/speech", json=body) for _ in range(burst)))
            return {"listing": listing, "request": request, "burst": len(fake.started()),
                    "statuses": dict(Counter(a.status_code for a in answers))}

    return asyncio.run(scenario())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-heavy", action="store_true", help="skip the torch backends (no Docker engine)")
    parser.add_argument("--burst", type=int, default=20, help="requests sent at once (default: 20)")
    parser.add_argument("--runs", type=int, default=5, help="Piper container starts to take the median of")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-modal-"))
    models = root / "models"

    hooks = {"piper": piper_hooks(models, args.runs)}
    if not args.no_heavy:
        hooks.update(heavy_hooks(root))
    print("before the snapshot (once) and after each restore (every container start), seconds;")
    print("'imports only' is what a restore paid when the snapshot held the imports alone:")
    print(f"  {'backend':24} {'before':>8} {'after':>8} {'imports only':>13}")
    for backend, figures in hooks.items():
        # Without weights in the snapshot a restore loaded them again: all but the imports.
        imports_only = figures["before"] - figures.get("import", 0.0) + figures["after"]
        print(f"  {backend:24} {figures['before']:8.3f} {figures['after']:8.3f} {imports_only:13.3f}")

    for ceiling in (1, 10):
        started = containers_started(models, args.burst, ceiling)
        print(f"containers started, example configs, tts-1 max_containers={ceiling}: "
              f"listing {started['listing']} (target 0), one request {started['request']}, "
              f"{args.burst} requests at once {started['burst']} (answers: {started['statuses']})")


if __name__ == "__main__":
    main()
