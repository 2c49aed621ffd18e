"""What a new voice costs its first request: upload to first audio with a voice just uploaded,
against the same voice's next request, through a live router in front of the Coqui image's worker
(a tiny XTTS v2, random weights: its speaker encoder and GPT run in full, on a short sentence).

    python bench/voices.py [--rounds 3]

Each round uploads a new 5 s MP3 recording (ElevenLabs' POST /v1/voices/add), asks for one
sentence with it (POST /v1/text-to-speech/{voice_id}/stream, the time to its first bytes), asks
again (the same seed: random weights stop generating at a random length otherwise), and deletes
the voice. The first request decodes nothing (the router decoded the upload)
but makes XTTS encode the reference into its conditioning latents; the second reads them from the
worker's memory. Prints each round and the medians, and the first request's cost as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

# The tests' ways to run code in an image, start processes and make recordings.
from tests.audio import encoded_voice  # noqa: E402
from tests.containers import image_python  # noqa: E402
from tests.processes import backend_worker, chorus_server  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
CONFIG = """
    name: xtts
    backend: coqui
    parameters:
      model: xtts
      language: en
"""


def first_audio(client: httpx.Client, voice_id: str) -> float:
    """Seconds from the request to its first audio bytes; the rest is read and dropped."""
    started = time.perf_counter()
    with client.stream("POST", f"/v1/text-to-speech/{voice_id}/stream", params={"output_format": "mp3_44100_128"},
                       json={"text": SENTENCE, "model_id": "xtts", "seed": 7}) as response:
        response.raise_for_status()
        chunks = response.iter_bytes()
        next(chunks)
        seconds = time.perf_counter() - started
        for _ in chunks:
            pass
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    python = image_python("coqui")
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-voices-"))
    models, configs = root / "models", root / "configs"
    subprocess.run([str(python), str(ROOT / "tests" / "tiny_models" / "coqui_models.py"), "xtts", str(models / "xtts")],
                   check=True, cwd=ROOT, capture_output=True)
    configs.mkdir()
    (configs / "xtts.yaml").write_text(textwrap.dedent(CONFIG))
    recording = encoded_voice(5.0, rate=44100, fmt="mp3")
    env = {"HF_HUB_OFFLINE": "1", "COQUI_TOS_AGREED": "1"}
    with backend_worker(python, "coqui", configs, models, root / "worker.log", env=env) as worker, \
            chorus_server(models, root / "router.log", configs_dir=configs,
                          env={"CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": f"coqui={worker}"}) as router, \
            httpx.Client(base_url=router.url, timeout=300) as client:
        rows = []
        for round_ in range(1, args.rounds + 1):
            started = time.perf_counter()
            added = client.post("/v1/voices/add", data={"name": f"bench {round_}"},
                                files={"files": ("me.mp3", recording, "audio/mpeg")})
            added.raise_for_status()
            voice_id = added.json()["voice_id"]
            upload = time.perf_counter() - started
            first = first_audio(client, voice_id)
            second = first_audio(client, voice_id)
            client.delete(f"/v1/voices/{voice_id}").raise_for_status()
            rows.append((upload, upload + first, second))
            print(f"round {round_}: upload {upload:.2f} s, upload to first audio {upload + first:.2f} s, "
                  f"same voice's next request to first audio {second:.2f} s")
    upload, new, again = (statistics.median(column) for column in zip(*rows, strict=True))
    print(f"median of {len(rows)}: upload {upload:.2f} s; upload to first audio {new:.2f} s; next request "
          f"{again:.2f} s; ratio {new / again:.1f}x")


if __name__ == "__main__":
    main()
