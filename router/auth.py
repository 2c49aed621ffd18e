"""API keys: with CHORUS_API_KEYS set, every route but the open ones needs one of them.

A key is accepted in any header an SDK of the three families sends: `Authorization: Bearer`
(OpenAI, LocalAI), `x-api-key`, and `xi-api-key` (ElevenLabs). Open without a key: liveness and
readiness (orchestrators probe them), the playground page and its files (a static page whose
API calls carry the key the user types) and the API description. `/metrics` is not open: usage
figures are the operator's, so scrapers send a key like any client.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from router.body_limit import ErrorRender
from router.settings import Settings
from router.voices import Caller

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/playground", "/openapi.json", "/docs", "/redoc"})
OPEN_PREFIXES = ("/playground/static/", "/docs/")


def presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    keys = []
    authorization = headers.get(b"authorization", b"")
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        keys.append(token.strip())
    for name in (b"x-api-key", b"xi-api-key"):
        if headers.get(name):
            keys.append(headers[name].strip())
    return keys


def key_matches(presented: list[bytes], keys: list[bytes]) -> bool:
    # Every presented key against every configured key, with no early exit: the time taken
    # tells nothing about which key, or how much of one, matched.
    matched = False
    for candidate in presented:
        for key in keys:
            matched |= hmac.compare_digest(candidate, key)
    return matched


def caller(presented: list[bytes], settings: Settings) -> Caller:
    """Whose saved voices a request sees: its key's, or every one for an admin key. Called once
    the key has been checked (or on a server with none)."""
    admin = [key.encode() for key in settings.admin_api_keys]
    if key_matches(presented, admin):
        return Caller(admin=True)
    users = [key.encode() for key in settings.api_keys]
    return Caller.from_key(next((key for key in presented if key_matches([key], users)), None))


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ApiKeys:
    """ASGI middleware: 401 in the path's API family shape unless a valid key is presented."""

    def __init__(self, app: ASGIApp, keys: list[str], render: ErrorRender):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.render = render


    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(dict(scope["headers"]))
        if key_matches(presented, self.keys):
            await self.app(scope, receive, send)
            return
        message = "invalid API key" if presented else (
            "an API key is required: send 'Authorization: Bearer <key>', 'x-api-key' or 'xi-api-key'"
        )
        response = self.render(Request(scope), 401, message, "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
