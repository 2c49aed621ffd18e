"""What each backend costs: every heavy backend at its published sizes, random weights, measured in
its own image through the production backend code (bench/real_size/run.py), beside Piper.

    python bench/backends.py [--full] [--only bark,kokoro] [--write bench/costs.md]

For each backend: build the model once (into --models, default a folder under the system's temp
directory; Kokoro's ONNX export needs torch and runs in a virtual environment of its own, see
bench/kokoro_model.py), load it, hold generation to a fixed number of tokens, and print load
seconds, first chunk, real-time factor (synthesis seconds per audio second), peak memory and audio
seconds per wall second with 1, 2, 4 and 8 requests at once on one loaded backend. CUDA is used where
the image's libraries find it; the device is printed. The short pass (32 tokens) fits in about ten
minutes on two cores once the models are built; --full generates 256 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.containers import image_python  # noqa: E402  (the tests' way to run code in an image)

BACKENDS = ("piper", "kokoro", "bark", "parler-tts", "transformers-musicgen", "coqui", "vall-e-x")
COLUMNS = ("load s", "first chunk s", "real-time factor", "x Piper's", "peak RSS MB", "peak CUDA MB",
           "audio s per wall s (1/2/4/8)")


def measure(backend: str, models: Path, tokens: int, concurrency: str) -> dict:
    if backend == "kokoro":
        # Its export needs torch, which Kokoro's image does not have: built here, beforehand.
        subprocess.run([sys.executable, str(ROOT / "bench" / "kokoro_model.py"), str(models / "kokoro-82m")],
                       check=True)
    started = time.perf_counter()
    result = subprocess.run(
        [str(image_python(backend)), str(ROOT / "bench" / "real_size" / "run.py"), backend, str(models),
         "--tokens", str(tokens), "--concurrency", concurrency],
        capture_output=True, text=True, timeout=3600,
    )
    if result.returncode != 0:
        return {"backend": backend, "error": result.stderr.strip().splitlines()[-1:] or ["no output"]}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    return figures


def row(figures: dict, piper: dict | None) -> str:
    if "error" in figures:
        return f"| `{figures['backend']}` | failed: {figures['error'][0][:120]} |" + " |" * (len(COLUMNS) - 1)
    curve = "/".join(str(value) for value in figures["audio_s_per_wall_s"].values())
    # The same run's Piper is the baseline: a ratio holds where a machine's absolute speed does not.
    ratio = round(figures["real_time_factor"] / piper["real_time_factor"], 1) if piper else ""
    cells = (figures["load_s"], figures["first_chunk_s"], figures["real_time_factor"], ratio, figures["peak_rss_mb"],
             figures["peak_cuda_mb"] or "", curve)
    return f"| `{figures['backend']}` ({figures['device']}) | " + " | ".join(str(cell) for cell in cells) + " |"


def table(results: list[dict], tokens: int) -> str:
    piper = next((r for r in results if r["backend"] == "piper" and "error" not in r), None)
    sources = "\n".join(f"- `{r['backend']}`: {r['source']}; {r['parameters'] or '?'} parameters"
                        for r in results if "source" in r)
    return "\n".join([
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({results[0].get('device', '?') if results else '?'}), {tokens} tokens per request, by bench/backends.py.",
        "",
        "| backend (device) | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
        *(row(r, piper) for r in results),
        "",
        "Sizes, random weights (compute does not depend on their values):",
        sources,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="256 tokens per request instead of 32")
    parser.add_argument("--only", help="comma-separated backends (default: all)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "chorus-real-size")
    parser.add_argument("--write", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    tokens = 256 if args.full else 32
    chosen = args.only.split(",") if args.only else BACKENDS
    args.models.mkdir(parents=True, exist_ok=True)
    results = []
    for backend in chosen:
        print(f"{backend}: building and measuring...", file=sys.stderr, flush=True)
        results.append(measure(backend, args.models, tokens, "1,2,4,8"))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = table(results, tokens)
    print(text)
    if args.write:
        args.write.write_text(f"# What each backend costs\n\n{text}\n")


if __name__ == "__main__":
    main()
