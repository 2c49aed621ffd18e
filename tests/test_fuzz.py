"""Property-based fuzzing of the served OpenAPI schema (schemathesis) against a running server:
valid and invalid inputs for every operation, a bounded number of examples each. No input may
cause a 5xx, and every error comes in its API family's shape.

One 500 is by design and allowed: text with letters or digits that the voice still makes no sound
of gives `synthesis_failed` / "produced no audio" rather than an empty file passed off as speech
(tests/test_failures.py checks that case; punctuation alone is a 400, tests/test_errors.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from router.app import create_app
from router.registry import ModelRegistry
from router.runners.local import InProcessRunner
from router.settings import Settings
from tests._live import assert_family_error, live_app, piper_setup

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configs, models = piper_setup(tmp_path_factory.mktemp("fuzz"))
    # A short input limit keeps each generated request's synthesis short; the limit itself is
    # part of what is fuzzed.
    with live_app(configs, models, max_input_chars=300) as url:
        yield url


# The schema the router serves; it does not depend on the models configured.
RAW_SCHEMA = create_app(Settings(), ModelRegistry([], Path(".")), InProcessRunner(Path("."))).openapi()
SCHEMA = schemathesis.openapi.from_dict(RAW_SCHEMA)
# Invalid input needs something to be invalid: operations that take no input get valid cases only.
CASES = [
    (f"{method.upper()} {path}", mode)
    for path, methods in RAW_SCHEMA["paths"].items()
    for method, spec in methods.items()
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or spec.get("parameters") or spec.get("requestBody")
]


def unspeakable(response) -> bool:
    if response.status_code != 500:
        return False
    body = response.json()
    error = body.get("error") or body.get("detail") or {}
    codes = {error.get("code"), error.get("status"), error.get("type")}
    return "synthesis_failed" in codes and "no audio" in error.get("message", "")


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_server_errors_and_errors_in_family_shape(fuzz_url, label, mode):
    operation = SCHEMA.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        response = case.call(base_url=fuzz_url, timeout=60)
        where = f"{case.method} {case.formatted_path}"
        if response.status_code >= 500:
            assert unspeakable(response), f"{where}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert_family_error(_View(response))

    check()


class _View:
    """Adapts a requests-style response to what assert_family_error reads."""

    def __init__(self, response):
        self._response = response
        self.status_code = response.status_code
        self.headers = {name.lower(): values[0] for name, values in response.headers.items()}
        self.text = response.text
        self.request = _Request(response.request.url, response.request.headers)

    def json(self):
        return self._response.json()


class _Request:
    def __init__(self, url: str, headers):
        self.url = httpx.URL(url)
        self.headers = httpx.Headers(dict(headers))
