"""API keys: every route family refuses a missing or wrong key with 401 in its own error shape and
accepts each of the three header forms; health, readiness and the playground page stay open;
/metrics needs a key once keys are set; a server with no keys is open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.auth import key_matches
from tests._live import assert_family_error, live_app, piper_setup

KEYS = ["first-key-0123", "second-key-4567"]
TEXT = "Hello."

#: (method, path, json body, query) for one route of each family, and the listing routes.
ROUTES = [
    ("POST", "/v1/audio/speech", {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"}, None),
    ("POST", "/tts", {"input": TEXT}, None),
    ("POST", "/v1/text-to-speech/en_US-joe-medium", {"text": TEXT}, {"output_format": "pcm_22050"}),
    ("POST", "/v1/text-to-speech/en_US-joe-medium/stream", {"text": TEXT}, {"output_format": "pcm_22050"}),
    ("POST", "/v1/sound-generation", {"text": "rain"}, None),
    ("GET", "/v1/models", None, None),
    ("GET", "/v1/audio/voices", None, None),
    ("GET", "/v1/audio/models", None, None),
    ("GET", "/v1/voices", None, None),
    ("GET", "/v2/voices", None, None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _, _ in ROUTES]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return piper_setup(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def url(setup: tuple[Path, Path]) -> Iterator[str]:
    configs, models = setup
    with live_app(configs, models, api_keys=KEYS) as running:
        yield running


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http


def call(client: httpx.Client, route: tuple, headers: dict[str, str]) -> httpx.Response:
    method, path, body, query = route
    return client.request(method, path, json=body, params=query, headers=headers)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_no_key_is_401_in_the_family_shape(client, route):
    response = call(client, route, {})
    error = assert_family_error(response, 401)
    assert "API key" in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_elevenlabs_client_listing_models_without_a_key_gets_its_own_shape(client):
    # GET /v1/models belongs to both APIs; the SDK's user agent decides, as for a 200.
    response = client.get("/v1/models", headers={"user-agent": "elevenlabs-python/2.0"})
    assert response.status_code == 401
    assert set(response.json()) == {"detail"}
    assert response.json()["detail"]["status"] == "invalid_api_key"


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-key"},
        {"x-api-key": "wrong-key"},
        {"xi-api-key": "wrong-key"},
        {"Authorization": f"Basic {KEYS[0]}"},  # the right key under the wrong scheme
        {"x-api-key": KEYS[0][:-1]},  # a prefix of a key
        {"x-api-key": KEYS[0] + "x"},
        {"x-api-key": "clé-non-ascii".encode()},
    ],
    ids=["bearer", "x-api-key", "xi-api-key", "basic-scheme", "prefix", "longer", "non-ascii"],
)
def test_wrong_key_is_401_in_the_family_shape(client, route, headers):
    error = assert_family_error(call(client, route, headers), 401)
    assert "API key" in error["message"]


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEYS[0]}"},
        {"authorization": f"bearer {KEYS[1]}"},
        {"x-api-key": KEYS[1]},
        {"xi-api-key": KEYS[0]},
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key", "xi-api-key"],
)
def test_each_header_form_with_a_valid_key_gets_through(client, route, headers):
    response = call(client, route, headers)
    # Past the key check the route answers as it would on an open server: sound generation has
    # no model here (404 in its family shape), the rest succeed.
    if route[1] == "/v1/sound-generation":
        assert_family_error(response, 404)
    else:
        assert response.status_code == 200, response.text


def test_speech_with_a_key_is_real_audio(client):
    response = client.post(
        "/v1/text-to-speech/en_US-joe-medium",
        params={"output_format": "pcm_22050"},
        json={"text": "Keys let this sentence through."},
        headers={"xi-api-key": KEYS[1]},
    )
    assert response.status_code == 200
    assert len(response.content) / 2 / 22050 > 1.0


def test_unknown_paths_need_a_key_too(client):
    # Without a key, nothing about which routes exist is given away.
    assert_family_error(client.get("/v1/nothing-here"), 401)
    assert_family_error(client.get("/v1/nothing-here", headers={"x-api-key": KEYS[0]}), 404)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/playground", "/openapi.json"])
def test_health_readiness_and_the_playground_stay_open(client, path):
    assert client.get(path).status_code == 200


def test_metrics_need_a_key_when_keys_are_set(client):
    assert_family_error(client.get("/metrics"), 401)
    assert_family_error(client.get("/metrics", headers={"x-api-key": "wrong"}), 401)
    response = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert response.status_code == 200
    assert "chorus_requests_total" in response.text
    # Refused requests are counted too, with the route they aimed at.
    assert 'route="/v1/audio/speech",status="401"' in response.text


def test_no_keys_means_an_open_server(setup):
    configs, models = setup
    with live_app(configs, models) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/tts", json={"input": TEXT}).status_code == 200
        assert client.get("/metrics").status_code == 200
        # A key sent to an open server is simply not needed.
        assert client.get("/v1/models", headers={"x-api-key": "anything"}).status_code == 200


def test_keys_are_compared_against_every_key_in_constant_time(monkeypatch):
    # No early exit: a wrong key costs as many comparisons as a right one, whichever key it is
    # closest to.
    import router.auth

    calls: list[tuple[bytes, bytes]] = []
    real = router.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(router.auth.hmac, "compare_digest", counting)
    keys = [key.encode() for key in KEYS]
    assert key_matches([KEYS[0].encode()], keys)
    assert len(calls) == len(KEYS)
    calls.clear()
    assert not key_matches([b"nope"], keys)
    assert len(calls) == len(KEYS)
