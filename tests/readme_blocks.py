"""The README's quick-start blocks, read from README.md, and how one is run as written against a
server on a given port: the quick-start test runs them against `chorus serve`, the container
tests against the compose stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.audio import audio_seconds
from tests.processes import REPO

README = REPO / "README.md"
AUDIO_SUFFIXES = {".mp3", ".wav", ".ogg", ".flac", ".aac"}


def quick_start_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    return re.findall(r"^```(sh|python)\n(.*?)^```", section.group(1), re.S | re.M)


BLOCKS = quick_start_blocks()
MAKE_BLOCKS = [code for lang, code in BLOCKS if lang == "sh" and re.search(r"^make run\b", code, re.M)]
RUN_BLOCKS = [(lang, code) for lang, code in BLOCKS if not (lang == "sh" and re.search(r"^make run\b", code, re.M))]


def block_id(block: tuple[str, str]) -> str:
    lang, code = block
    first = next(line for line in code.splitlines() if line.strip() and not line.startswith("#"))
    return f"{lang}: {first[:40]}"


def run_quick_start_block(block: tuple[str, str], port: int, folder: Path, log: str = "") -> None:
    """Run a quick-start block as written, against a server on `port`, in `folder`; check that
    every audio file it names is there and real, and what it prints of the server's lists."""
    lang, code = block
    code = code.replace("localhost:8080", f"localhost:{port}")
    if lang == "sh":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\nserver log:\n{log}"

    named = set(re.findall(r"""(?:-o |["'])([\w.-]+\.(?:mp3|wav|ogg|flac|aac))\b""", code))
    assert named, "the block writes no audio file"
    written = {path.name for path in folder.iterdir() if path.suffix in AUDIO_SUFFIXES}
    assert written == named
    for name in named:
        seconds = audio_seconds(folder / name)
        assert seconds > 0.5, f"{name} holds {seconds:.2f} s of audio"
    if lang == "sh" and "/v1/models" in code:
        assert '"id":"tts-1"' in result.stdout.replace(" ", "")
        assert "en_US-joe-medium" in result.stdout
