"""One heavy backend at its real size, measured inside its own image; prints one JSON line.

    python bench/real_size/run.py BACKEND MODELS_DIR [--tokens N] [--concurrency 1,2,4,8]
                                  [--budget SECONDS] [--batch N]

BACKEND names a module of bench/real_size (bark, kokoro...). It builds the model (once), loads it
through the production backend (`functions.create_backend`, `load`, `to_device`), holds generation
to `--tokens` tokens, then times one request alone (the first chunk and the whole: the curve's
point 1) and the same request from 2, 4 and 8 threads at once on the one loaded backend, as one
worker serves them. With --budget (seconds from the end of the build), a point that would not end
within it is skipped (null). With --batch, a backend module that has `batched` also times one generate over N copies of
the request: what batching in the worker would give.
"""

from __future__ import annotations

import argparse
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
from functions.config import ModelConfig  # noqa: E402
from functions.protocol import SynthesisRequest  # noqa: E402

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


def fits(deadline: float | None, seconds: float) -> bool:
    return deadline is None or time.perf_counter() + seconds <= deadline


def curve_of(backend, request: SynthesisRequest, counts: list[int], audio_s: float, alone: float,
             deadline: float | None) -> dict[int, float | None]:
    """Audio seconds per wall second at each count; 1 is the request already timed (`alone`, for
    `audio_s` of audio). A point expected to end after `deadline`, at the last point's rate, is None."""
    curve: dict[int, float | None] = {}
    rate = alone
    for count in counts:
        if count == 1:
            curve[count] = alone
        elif fits(deadline, audio_s * count / rate):
            curve[count] = rate = concurrently(backend, request, count)
        else:
            curve[count] = None
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("backend")
    parser.add_argument("models", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--budget", type=float, help="seconds the measuring may take, once the model is built")
    parser.add_argument("--batch", type=int, help="also time one generate over this many requests")
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
    curve = curve_of(backend, request, [int(count) for count in args.concurrency.split(",")],
                     audio_s=seconds, alone=seconds / total, deadline=deadline)
    batched = None
    # At worst a batch costs what its requests cost one after another.
    if args.batch and hasattr(module, "batched") and fits(deadline, total * args.batch):
        start = time.perf_counter()
        batched = module.batched(backend, request, args.batch) / backend.sample_rate / (time.perf_counter() - start)
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
        "audio_s_per_wall_s": {str(count): value if value is None else round(value, 2)
                               for count, value in curve.items()},
        "batched": {str(args.batch): round(batched, 2)} if batched is not None else None,
    }))


if __name__ == "__main__":
    main()
