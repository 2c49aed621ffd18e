"""One heavy backend at its real size, measured inside its own image; prints one JSON line.

    python bench/real_size/run.py BACKEND MODELS_DIR [--tokens N] [--concurrency 1,2,4,8]

BACKEND names a module of bench/real_size (bark, kokoro...). It builds the model (once), loads it
through the production backend (`functions.create_backend`, `load`, `to_device`), holds generation
to `--tokens` tokens, then times one request alone (the first chunk and the whole) and the same
request from 1, 2, 4 and 8 threads at once on the one loaded backend, as one worker serves them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import threading
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("backend")
    parser.add_argument("models", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    module = importlib.import_module(f"bench.real_size.{args.backend.replace('-', '_')}")
    on, torch = device()

    start = time.perf_counter()
    config = ModelConfig.model_validate(module.build(args.models))
    built = time.perf_counter() - start
    start = time.perf_counter()
    backend = create_backend(config, args.models)
    backend.load()
    backend.to_device()
    loaded = time.perf_counter() - start
    module.fix_length(backend, args.tokens)
    request = SynthesisRequest(model=config.name, text=TEXT, **getattr(module, "REQUEST", {}))

    speak(backend, request)  # the first request pays for lazy set-up (kernels, caches), not counted
    first_chunk, total, samples = speak(backend, request)
    seconds = samples / backend.sample_rate
    curve = {count: concurrently(backend, request, count) for count in map(int, args.concurrency.split(","))}
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
        "audio_s_per_wall_s": {str(count): round(value, 2) for count, value in curve.items()},
    }))


if __name__ == "__main__":
    main()
