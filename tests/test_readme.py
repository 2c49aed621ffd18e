"""The README's quick start, run as written against a real server.

The fenced `sh` and `python` blocks of the "Quick start" section are read from README.md at
collection time, so the test follows the README: a command added there is run here. The block
with `make run` and `make test` is checked against the Makefile rather than run (the test starts
the same `chorus serve` itself, and `make test` is this suite); every other block runs in a
scratch folder, with the README's port 8080 replaced by the test server's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import audio_seconds
from tests.processes import REPO, chorus_server

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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("readme")
    (root / "models").mkdir()
    with chorus_server(root / "models", root / "server.log") as running:
        yield running


def test_quick_start_gives_the_two_make_commands_that_the_makefile_has():
    assert len(MAKE_BLOCKS) == 1, "the quick start must show `make run` and `make test` in one block"
    commands = [line.split("#")[0].strip() for line in MAKE_BLOCKS[0].splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (REPO / "Makefile").read_text()
    # `make run` is `chorus serve` on port 8080, which the other blocks address.
    assert re.search(r"^run:.*\n\t\$\(BIN\)/chorus serve\s*$", makefile, re.M)
    from router.settings import Settings

    assert Settings().port == 8080 and Settings().host == "127.0.0.1"
    assert re.search(r"^test:.*\n\t\$\(BIN\)/pytest", makefile, re.M)


def test_quick_start_has_curl_openai_and_elevenlabs_examples():
    assert [lang for lang, _ in RUN_BLOCKS] == ["sh", "python", "python"]
    assert "curl " in RUN_BLOCKS[0][1]
    assert 'base_url="http://localhost:8080/v1"' in RUN_BLOCKS[1][1]
    assert 'base_url="http://localhost:8080"' in RUN_BLOCKS[2][1]
    assert 'voice_id="en_US-joe-medium"' in RUN_BLOCKS[2][1]


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


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block_id(b) for b in RUN_BLOCKS])
def test_quick_start_block_runs_as_written(block, server, tmp_path):
    run_quick_start_block(block, server.port, tmp_path, server.output())
