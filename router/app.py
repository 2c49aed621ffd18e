"""The FastAPI application: one router for the LocalAI, OpenAI and ElevenLabs APIs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from router.api import elevenlabs, localai, metrics, openai, playground, system
from router.api.common import is_elevenlabs_client
from router.api.elevenlabs.socket import SocketLimit
from router.auth import ApiKeys
from router.body_limit import BodyLimit
from router.cache import SynthesisCache
from router.metrics import Metrics, MetricsMiddleware
from router.registry import ModelRegistry
from router.runners import Runner
from router.settings import Settings
from router.speech import SpeechService

log = logging.getLogger("chorus")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_ELEVENLABS_PREFIXES = ("/v1/text-to-speech", "/v1/voices", "/v2/voices", "/v1/sound-generation")


def error_family(path: str, headers: Mapping[str, str]) -> Literal["openai", "localai", "elevenlabs"]:
    """The API family whose error shape a request to `path` gets. /v1/models is the one path
    both OpenAI and ElevenLabs own: ElevenLabs' clients (known by their headers) get theirs."""
    if path.startswith(_ELEVENLABS_PREFIXES) or (path == "/v1/models" and is_elevenlabs_client(headers)):
        return "elevenlabs"
    if path.startswith(("/tts", "/api/voice-profiles")):
        return "localai"
    return "openai"


def _fallback_error(
    request: Request, status: int, message: str, code: str = "not_found"
) -> JSONResponse:
    """Errors no route saw (unknown path, wrong method, missing API key, body too large), in
    the shape of the family the path belongs to."""
    render = {"elevenlabs": elevenlabs.elevenlabs_error, "localai": localai.localai_error,
              "openai": openai.openai_error}[error_family(request.url.path, request.headers)]
    return render(status, message, None, code)


def build_runner(settings: Settings) -> Runner:
    """The runner for the configured mode; only that mode's client code is imported."""
    if settings.mode == "http":
        from router.runners.http import HttpRunner

        return HttpRunner.from_settings(settings)
    if settings.mode == "docker":
        from router.runners.docker import DockerRunner

        return DockerRunner.from_settings(settings)
    if settings.mode == "modal":
        from router.runners.modal import ModalRunner

        return ModalRunner.from_settings(settings)
    from router.runners.local import InProcessRunner

    return InProcessRunner(settings.models_dir, settings.configless_models, settings.memory_release_seconds)


def create_app(
    settings: Settings | None = None,
    registry: ModelRegistry | None = None,
    runner: Runner | None = None,
) -> FastAPI:
    settings = settings or Settings.from_env()
    registry = registry or ModelRegistry.from_dir(
        settings.configs_dir, settings.models_dir, settings.configless_models
    )
    runner = runner or build_runner(settings)
    cache = None
    if settings.cache_dir is not None and settings.cache_max_mb > 0:
        cache = SynthesisCache(
            settings.cache_dir, int(settings.cache_max_mb * 1024 * 1024), settings.models_dir
        )
    speech = SpeechService(registry, runner, settings, cache=cache, metrics=Metrics())
    wyoming = None
    if settings.wyoming_port is not None:
        from router.api.wyoming import WyomingServer

        wyoming = WyomingServer(speech)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /healthz answers at once, /readyz once models are in.
        loading = asyncio.create_task(runner.start(registry.all()))
        loading.add_done_callback(_report_load_failure)
        # On the HTTP server's loop, sharing its service (and so its models, queues and cache).
        if wyoming is not None:
            await wyoming.start()
        yield
        if wyoming is not None:
            await wyoming.stop()
        loading.cancel()
        await runner.close()

    app = FastAPI(title="Chorus", summary="Many voices, one endpoint", lifespan=lifespan)
    app.state.speech = speech
    app.state.sockets = SocketLimit(settings.websocket_max_sockets)
    app.state.wyoming = wyoming
    routers = (system.router, localai.router, openai.router, *elevenlabs.routers, playground.router, metrics.router)
    for router in routers:
        app.include_router(router)
    # Outermost last: metrics see every answer, the key is checked before the body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, render=_fallback_error,
                       upload_bytes=settings.max_voice_upload_bytes)
    app.add_middleware(ApiKeys, keys=settings.every_api_key, render=_fallback_error)
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(MetricsMiddleware, metrics=speech.metrics, routes=routes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
        return _fallback_error(request, exc.status_code, str(exc.detail), code)

    return app


def _report_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading models failed: %s", task.exception())
