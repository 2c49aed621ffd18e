"""The FastAPI application: one router for the LocalAI, OpenAI and ElevenLabs APIs."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from router.api import elevenlabs, localai, openai, system
from router.api.common import validation_problem
from router.registry import ModelRegistry
from router.runners import Runner
from router.settings import Settings
from router.speech import SpeechService

log = logging.getLogger("chorus")

_ELEVENLABS_PREFIXES = ("/v1/text-to-speech", "/v1/voices", "/v2/voices", "/v1/sound-generation")


def _fallback_error(request: Request, status: int, message: str) -> JSONResponse:
    """Errors no route saw (unknown path, wrong method), in the shape of the family the path
    belongs to."""
    path = request.url.path
    if path.startswith(_ELEVENLABS_PREFIXES):
        return elevenlabs.elevenlabs_error(status, message, None, "not_found")
    if path.startswith("/tts"):
        return localai.localai_error(status, message, None, "not_found")
    return openai.openai_error(status, message, None, "not_found")


def build_runner(settings: Settings) -> Runner:
    """The runner for the configured mode; only that mode's client code is imported."""
    if settings.mode == "http":
        from router.runners.http import HttpRunner

        return HttpRunner.from_settings(settings)
    if settings.mode == "modal":
        from router.runners.modal import ModalRunner

        return ModalRunner.from_settings(settings)
    from router.runners.local import InProcessRunner

    return InProcessRunner(settings.models_dir)


def create_app(
    settings: Settings | None = None,
    registry: ModelRegistry | None = None,
    runner: Runner | None = None,
) -> FastAPI:
    settings = settings or Settings.from_env()
    registry = registry or ModelRegistry.from_dir(settings.configs_dir, settings.models_dir)
    runner = runner or build_runner(settings)
    speech = SpeechService(registry, runner, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /healthz answers at once, /readyz once models are in.
        loading = asyncio.create_task(runner.start(registry.all()))
        loading.add_done_callback(_report_load_failure)
        yield
        loading.cancel()
        await runner.close()

    app = FastAPI(title="Chorus", summary="Many voices, one endpoint", lifespan=lifespan)
    app.state.speech = speech
    for module in (system, localai, openai, elevenlabs):
        app.include_router(module.router)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _fallback_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _fallback_error(request, 400, validation_problem(exc)[0])

    return app


def _report_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading models failed: %s", task.exception())
