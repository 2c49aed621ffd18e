"""The cap on request bodies: over `max_bytes` is 413 in the path's API family shape, before any
of it reaches a route."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ErrorRender = Callable[[Request, int, str, str], Response]


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 in the path's API family shape, before
    any of it reaches a route: by Content-Length at once, or as soon as a chunked body passes
    the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, render: ErrorRender):
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        # Read the body here (the route reads all of it anyway) and replay it: a limit checked
        # inside `receive` could only fail halfway through the route's parsing.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # what follows is the disconnect a streaming response awaits

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.render(
            Request(scope),
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            "request_too_large",
        )
        # The client may still be sending: close rather than read the rest.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
