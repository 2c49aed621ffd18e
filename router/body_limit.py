"""The cap on request bodies: over `max_bytes` (`upload_bytes` on the voice upload routes) is 413
in the path's API family shape, before any of it reaches a route."""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ErrorRender = Callable[[Request, int, str, str], Response]

#: The routes whose bodies carry a voice's recordings (multipart), allowed `upload_bytes`.
VOICE_UPLOADS = re.compile(r"^(/v1/voices/add|/v1/voices/[^/]+/edit|/v1/audio/voices|/v1/audio/voice_consents"
                           r"|/api/voice-profiles)/?$")


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 in the path's API family shape, before
    any of it reaches a route: by Content-Length at once, or as soon as a chunked body passes
    the limit."""

    #: What is read and thrown away of a body too large before the 413 is sent.
    DRAIN_BYTES = 64 * 1024 * 1024

    def __init__(self, app: ASGIApp, max_bytes: int, render: ErrorRender, upload_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes or max_bytes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if VOICE_UPLOADS.match(scope["path"]) else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, limit, more=True)
            return
        # Read the body here (the route reads all of it anyway) and replay it: a limit checked
        # inside `receive` could only fail halfway through the route's parsing.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await self._refuse(scope, receive, send, limit, more=more)
                return
            if not more:
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # what follows is the disconnect a streaming response awaits

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int, more: bool) -> None:
        """413, once the client has sent the rest of its body (`more`): a client that writes all
        of its body before it reads (httpx's and openai's async clients) sees a connection reset,
        not the answer, if the server stops reading and closes. Past DRAIN_BYTES it is closed."""
        drained = 0
        while more and drained <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = self.render(
            Request(scope),
            413,
            f"the request body is larger than {limit} bytes",
            "request_too_large",
        )
        if more:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)
