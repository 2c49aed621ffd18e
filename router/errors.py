"""Errors raised anywhere after a route has parsed its request.

Each carries an HTTP status, a message a person can act on, and the request field at fault; each
API family renders them in its own error shape.
"""

from __future__ import annotations


class ChorusError(Exception):
    status = 500
    code = "internal_error"
    #: Extra response headers (Retry-After on overload).
    headers: dict[str, str] = {}

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ChorusError):
    status = 400
    code = "invalid_request"


class ModelNotFound(ChorusError):
    status = 404
    code = "model_not_found"


class VoiceNotFound(ChorusError):
    status = 404
    code = "voice_not_found"


class NotFound(ChorusError):
    status = 404
    code = "not_found"


class UnsupportedAudio(ChorusError):
    """An upload that is no audio FFmpeg can decode."""

    status = 415
    code = "unsupported_audio"


class StorageFailed(ChorusError):
    """The models directory could not keep a change to the voice library (read-only, full, a
    shared volume that would not commit); nothing of the change is left."""

    status = 503
    code = "storage_unavailable"


class BackendUnavailable(ChorusError):
    status = 503
    code = "backend_unavailable"


class SynthesisFailed(ChorusError):
    status = 500
    code = "synthesis_failed"


class Overloaded(ChorusError):
    """The model is busy and its queue is full (429), or a queued request waited too long (503);
    `retry_after` says when trying again makes sense."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: int, status: int = 429):
        super().__init__(message)
        self.status = status
        self.headers = {"Retry-After": str(retry_after)}


class ModelStarting(ChorusError):
    """The model's container is still starting, longer than the platform lets a response wait;
    it goes on starting, and a retry after `retry_after` seconds finds it warm."""

    status = 503
    code = "model_starting"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


def backend_error(backend: str, code: str, message: str, param: str | None = None) -> ChorusError:
    """The router's error for a backend failure's code (functions.protocol.FAILURES), wherever
    the backend runs (this process, its worker, Modal). Where the backend is at fault the
    message names it, once."""
    if not message.startswith(f"backend '{backend}'"):
        if code == "backend_unavailable":
            message = f"backend '{backend}' is unavailable: {message}"
        elif code == "synthesis_failed":
            message = f"backend '{backend}' failed: {message}"
    if code == "model_not_found":
        param = "model"
    errors = {error.code: error for error in (InvalidRequest, ModelNotFound, BackendUnavailable, SynthesisFailed)}
    return errors.get(code, SynthesisFailed)(message, param=param)


class BackendTimeout(ChorusError):
    status = 504
    code = "backend_timeout"
