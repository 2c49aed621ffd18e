"""What the API families share: error translation around their routes, and the service handle."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from router.errors import ChorusError
from router.speech import AudioStream, SpeechService

log = logging.getLogger("chorus")

#: (status, message, param, code) -> the family's error response
ErrorRenderer = Callable[[int, str, str | None, str], JSONResponse]


def validation_problem(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a validation error as a sentence and the field it names."""
    error = exc.errors()[0]
    where = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(where) or None
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
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
                except ChorusError as exc:
                    return render(exc.status, exc.message, exc.param, exc.code)
                except Exception:
                    log.exception("unexpected error on %s", request.url.path)
                    return render(500, "internal server error", None, "internal_error")

            return handle

    return FamilyRoute


def speech_service(request: Request) -> SpeechService:
    return request.app.state.speech


def audio_response(stream: AudioStream) -> StreamingResponse:
    return StreamingResponse(stream, media_type=stream.media_type)
