"""The README's quick start, run as written against a real server.

The fenced `sh` and `python` blocks of the "Quick start" section are read from README.md at
collection time, so the test follows the README: a command added there is run here. The block
with `make run` and `make test` is checked against the Makefile rather than run (the test starts
the same `chorus serve` itself, and `make test` is this suite); every other block runs in a
scratch folder, with the README's port 8080 replaced by the test server's.
"""

from __future__ import annotations

import re

import pytest

from tests.processes import REPO, chorus_server
from tests.readme_blocks import MAKE_BLOCKS, RUN_BLOCKS, block_id, run_quick_start_block


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


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block_id(b) for b in RUN_BLOCKS])
def test_quick_start_block_runs_as_written(block, server, tmp_path):
    run_quick_start_block(block, server.port, tmp_path, server.output())
