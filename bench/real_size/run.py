"""One heavy backend at its real size, measured inside its own image; prints one JSON line.

    python bench/real_size/run.py BACKEND MODELS_DIR [--tokens N] [--concurrency 1,2,4,8]
                                  [--budget SECONDS]

BACKEND names a module of bench/real_size (bark, kokoro...). It builds the model (once), loads it
through the production backend (`functions.create_backend`, `load`, `to_device`), holds generation
to `--tokens` tokens, then times one request alone (the first chunk and the whole: the curve's
point 1) and the same request from 2, 4 and 8 threads at once on the one loaded backend, as one
worker serves them. With --budget (seconds from the end of the build), a point that would not end
within it is skipped (null). A backend that generates batches (functions.batching) is timed again
at each point through the host that serves it (functions.serving), batching up to the largest
count (`deploy.max_batch_size`) with a 50 ms window (`deploy.batch_wait_ms`): the same requests,
with batching and without, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Run as a script, this folder leads sys.path, and its piper.py would shadow the piper package.
sys.path[:] = [str(ROOT), *(entry for entry in sys.path if Path(entry or ".").resolve() != HERE)]

from functions import create_backend  # noqa: E402
from functions.batching import Batchable  # noqa: E402
from functions.config import ModelConfig  # noqa: E402
from functions.protocol import SynthesisRequest  # noqa: E402

#: The batching window measured: requests sent together start together, as a GPU config would set it.
BATCH_WAIT_SECONDS = 0.05
TEXT = "The quick brown fox jumps over the lazy dog. The dog does not mind at all, and sleeps on."


def device() -> tuple[str, object]:
    """The device the backends pick (CUDA when present) and torch, where the image has it."""
    try:
        import torch
    except ImportError:
        import onnxruntime

        return ("cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"), None
    return ("cuda" if torch.cuda.is_available() else "cpu"), torch


def speak(backend, request: SynthesisRequest) -> tuple[float, float, int]:
    """(seconds to the first PCM chunk, seconds in all, samples)."""
    start = time.perf_counter()
    first, samples = None, 0
    for piece in backend.synthesize(request):
        if isinstance(piece, bytes | bytearray) and piece:
            first = first if first is not None else time.perf_counter() - start
            samples += len(piece) // 2
    return first or 0.0, time.perf_counter() - start, samples


def concurrently(backend, request: SynthesisRequest, count: int) -> float:
    """Audio seconds per wall second with `count` requests at once."""
    results: list[tuple[float, float, int]] = []
    threads = [threading.Thread(target=lambda: results.append(speak(backend, request))) for _ in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return sum(samples for _, _, samples in results) / backend.sample_rate / wall


def through_host(backend, request: SynthesisRequest, count: int, batch_size: int) -> float:
    """Audio seconds per wall second with `count` requests at once through the host, which batches."""
    from anyio import CapacityLimiter

    from functions.batching import Batcher
    from functions.serving import LoadedBackend

    async def run() -> float:
        batcher = Batcher(backend, batch_size, BATCH_WAIT_SECONDS, lambda size, waits: None)
        loaded = LoadedBackend(backend, CapacityLimiter(count), batcher=batcher)

        async def samples() -> int:
            return sum([len(pcm) // 2 async for pcm in loaded.chunks(request)])

        start = time.perf_counter()
        made = sum(await asyncio.gather(*(samples() for _ in range(count))))
        return made / backend.sample_rate / (time.perf_counter() - start)

    return asyncio.run(run())


def fits(deadline: float | None, seconds: float) -> bool:
    return deadline is None or time.perf_counter() + seconds <= deadline


def curve_of(backend, request: SynthesisRequest, counts: list[int], audio_s: float, alone: float,
             deadline: float | None, batch_size: int | None) -> tuple[dict, dict]:
    """Audio seconds per wall second at each count, one generation at a time; 1 is the request
    already timed (`alone`, for `audio_s` of audio). With `batch_size`, each point is timed again
    through the host batching up to it, right after, so that both see the machine as it was. A
    point expected to end after `deadline`, at the last point's rate, is None."""
    curve: dict[int, float | None] = {}
    batched: dict[int, float | None] = {}
    rate = alone
    for count in counts:
        if count == 1:
            curve[count] = alone
        elif fits(deadline, audio_s * count / rate):
            curve[count] = rate = concurrently(backend, request, count)
        else:
            curve[count] = None
        if batch_size:
            # At worst a batch costs what its requests cost one after another.
            on_time = curve[count] is not None and fits(deadline, audio_s * count / rate)
            batched[count] = through_host(backend, request, count, batch_size) if on_time else None
    return curve, batched


def figures(curve: dict[int, float | None]) -> dict[str, float | None] | None:
    """Three significant digits: the heavy backends' rates are hundredths on a CPU."""
    return {str(count): value if value is None else float(f"{value:.3g}") for count, value in curve.items()} or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("backend")
    parser.add_argument("models", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--budget", type=float, help="seconds the measuring may take, once the model is built")
    args = parser.parse_args()
    module = importlib.import_module(f"bench.real_size.{args.backend.replace('-', '_')}")
    on, torch = device()

    start = time.perf_counter()
    # Built in a process of its own, so that the peak memory measured is serving's, not building's;
    # then asked again here, where it finds the model built and returns its config.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as builder:
        builder.submit(module.build, args.models).result()
    config = ModelConfig.model_validate(module.build(args.models))
    built = time.perf_counter() - start
    start = time.perf_counter()
    deadline = start + args.budget if args.budget is not None else None
    backend = create_backend(config, args.models)
    backend.load()
    backend.to_device()
    loaded = time.perf_counter() - start
    module.fix_length(backend, args.tokens)
    request = SynthesisRequest(model=config.name, text=TEXT, **getattr(module, "REQUEST", {}))

    speak(backend, request)  # the first request pays for lazy set-up (kernels, caches), not counted
    first_chunk, total, samples = speak(backend, request)
    seconds = samples / backend.sample_rate
    counts = [int(count) for count in args.concurrency.split(",")]
    curve, batched = curve_of(backend, request, counts, audio_s=seconds, alone=seconds / total, deadline=deadline,
                              batch_size=max(counts) if isinstance(backend, Batchable) else None)
    print(json.dumps({
        "backend": args.backend,
        "device": on,
        "source": module.SOURCE,
        "parameters": getattr(module, "parameters", lambda b: None)(backend),
        "tokens": args.tokens,
        "build_s": round(built, 1),
        "load_s": round(loaded, 2),
        "first_chunk_s": round(first_chunk, 3),
        "audio_s": round(seconds, 2),
        "real_time_factor": round(total / seconds, 3) if seconds else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on == "cuda" and torch else None,
        "audio_s_per_wall_s": figures(curve),
        "batched_audio_s_per_wall_s": figures(batched),
    }))


if __name__ == "__main__":
    main()
