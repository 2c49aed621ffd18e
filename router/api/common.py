"""What the API families share: error translation around their routes, and the service handle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from functions.streams import Stream
from router.auth import caller, presented_keys
from router.encoding import EncodedAudio
from router.errors import ChorusError
from router.speech import SpeechService
from router.voices import Caller, Upload

log = logging.getLogger("chorus")

#: (status, message, param, code) -> the family's error response
ErrorRenderer = Callable[[int, str, str | None, str], JSONResponse]


def is_elevenlabs_client(headers: Mapping[str, str]) -> bool:
    """Whether a request to a path both OpenAI and ElevenLabs own (GET /v1/models) comes from an
    ElevenLabs client: its key header or its SDK's user agent says so."""
    return "xi-api-key" in headers or headers.get("user-agent", "").startswith("elevenlabs")


def _is_tag(part: object) -> bool:
    """Parts of a pydantic error location that name where or which union member, not a field."""
    if not isinstance(part, str):
        return False
    return (
        part in ("body", "query", "path", "header", "str", "int", "float", "bool")
        or part[:1].isupper()
        or "[" in part
        or part.startswith("function-")
    )


def validation_problem(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a validation error as a sentence and the field it names."""
    error = exc.errors()[0]
    where = [str(part) for part in error.get("loc", ()) if not _is_tag(part)]
    param = ".".join(where) or None
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if error.get("type") == "missing" and param is None:
        return "the request body is missing: send a JSON object", None
    if error.get("type") == "model_attributes_type":
        return "the request body must be a JSON object", None
    message = error.get("msg", "invalid value")
    return (f"'{param}': {message}" if param else message), param


def family_route(render: ErrorRenderer, validation_status: int) -> type[APIRoute]:
    """A route class that renders every error raised before the response starts in `render`'s
    shape, so a family's clients always get the error body their SDK knows how to read."""

    class FamilyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    message, param = validation_problem(exc)
                    return render(validation_status, message, param, "invalid_request")
                except HTTPException as exc:
                    # FastAPI's own refusals, e.g. a body that is not text at all.
                    return render(exc.status_code, str(exc.detail), None, "invalid_request")
                except ChorusError as exc:
                    response = render(exc.status, exc.message, exc.param, exc.code)
                    response.headers.update(exc.headers)
                    return response
                except Exception:
                    log.exception("unexpected error on %s", request.url.path)
                    return render(500, "internal server error", None, "internal_error")

            return handle

    return FamilyRoute


def speech_service(request: Request) -> SpeechService:
    return request.app.state.speech


def request_caller(request: Request) -> Caller:
    """Whose saved voices the request may see and change (the key middleware has checked it)."""
    headers = {k.lower(): v for k, v in request.headers.raw}
    return caller(presented_keys(headers), request.app.state.speech.settings)


async def uploads(files: list[UploadFile]) -> list[Upload]:
    """A form's files, read (the body limit has bounded them already)."""
    return [Upload(file.filename or "upload", await file.read()) for file in files]


class AudioResponse(StreamingResponse):
    """Sends `stream` (or `body`, made from it: SSE events, JSON lines) and closes the stream
    however the response ends, even when it is never iterated (a client gone before the status
    line), so the model's place and the backend's stream are always released. A client that
    leaves before the end is logged (the access log has already said 200)."""

    def __init__(
        self, stream: EncodedAudio | Stream[Any], body: AsyncIterator[bytes] | None = None,
        media_type: str | None = None,
    ):
        super().__init__(
            self._counted(stream if body is None else body),
            media_type=media_type or stream.media_type,
            headers=getattr(stream, "headers", None),
        )
        self.stream = stream
        self._sent = 0
        #: "sent" once the body has ended, "failed" if it raised: otherwise its client left.
        self._outcome = ""

    async def _counted(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for data in body:
                yield data
                self._sent += len(data)
        except Exception:
            self._outcome = "failed"
            raise
        self._outcome = "sent"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._outcome:
                log.info("%s %s: the client left after %d bytes of audio; stopping its synthesis",
                         scope.get("method", ""), scope.get("path", ""), self._sent)
            await self.stream.aclose()
