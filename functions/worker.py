"""The backend worker: a small ASGI app that hosts one backend inside its container.

    CHORUS_BACKEND=piper python -m functions.worker

At start it loads every config in the configs directory whose `backend:` is its own, in the
background so that `GET /healthz` can answer 503 until they are in. The router (http mode)
talks to it over a small protocol:

- `POST /synthesize` `{"config": ModelConfig, "request": SynthesisRequest}` -> 200, raw PCM
  streamed as it is made (`application/octet-stream`; `X-Sample-Rate`, `X-Sample-Format: s16le`,
  `X-Channels: 1`). A request that asks for `word_times` gets frames instead (PCM and word
  times, `functions.protocol.frame`, `application/x-chorus-framed-pcm`).
- `POST /voices` `{"config": ModelConfig}` -> `{"voices": [...]}`.
- `GET /metrics` -> batching per model (`functions.batch_metrics`), in Prometheus's text format.
- `GET /healthz` -> 200 once the start-up load is done, else 503: `"status": "loading"`, or
  `"failed"` with its `problem` when it can load nothing (its configs cannot be read) and never will.

Errors are JSON, `{"error": {"message", "code", "param"}}`, with status 400 (the request asks
for something the model cannot do), 503 (loading, or the backend is not in this image) or 500
(synthesis failed). The first chunk is made before the status is sent, so a request's errors
always arrive as a proper error; a failure after that aborts the response, which the router
reads as an incomplete body, never as a complete file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from functions.config import BackendName, ConfigError, ModelConfig, load_configs
from functions.protocol import FRAMED_MEDIA_TYPE, SAMPLE_FORMAT, STATUS, Spoken, SynthesisRequest, frame
from functions.serving import (
    BackendPool,
    LoadedBackend,
    ServingError,
    configless_limit,
    memory_release_seconds,
)

log = logging.getLogger("chorus.worker")

DEFAULT_PORT = 9000

#: The status each kind of backend failure is answered with.


class SynthesizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: ModelConfig
    request: SynthesisRequest


class VoicesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: ModelConfig


class WorkerError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "code": self.code, "param": self.param}},
            status_code=self.status,
        )

    @classmethod
    def of(cls, failure: ServingError) -> WorkerError:
        return cls(STATUS[failure.code], failure.code, failure.message, failure.param)


class Worker:
    def __init__(self, backend: str, configs_dir: Path, models_dir: Path):
        if backend not in get_args(BackendName):
            raise ValueError(
                f"unknown backend '{backend}'; set CHORUS_BACKEND to one of: "
                f"{', '.join(get_args(BackendName))}"
            )
        self.backend = backend
        self.configs_dir = configs_dir
        self.models_dir = models_dir
        self.pool = BackendPool(models_dir, configless_limit(), release_after=memory_release_seconds())
        self.ready = False
        self.failures: dict[str, str] = {}
        #: Why the worker can load none of its models (its configs cannot be read): it will never
        #: be ready, and says so rather than look as if it were still loading.
        self.problem: str | None = None

    async def load_all(self) -> None:
        """Load this backend's configs. A model that fails to load is reported on /healthz and
        in its requests' errors; it does not keep the worker's other models from serving."""
        try:
            configs = load_configs(self.configs_dir, self.models_dir) if self.configs_dir.is_dir() else []
        except (ConfigError, OSError) as exc:
            self.problem = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("the worker cannot load its models: %s", self.problem)
            return
        for config in configs:
            if config.backend != self.backend:
                continue
            try:
                await self.pool.get(config)
                log.info("model '%s' loaded", config.name)
            except Exception as exc:
                self.failures[config.name] = str(exc)
                log.error("model '%s' is not loaded: %s", config.name, exc)
        self.ready = True

    async def loaded(self, config: ModelConfig) -> LoadedBackend:
        if self.problem is not None:
            raise WorkerError(503, "backend_unavailable",
                              f"the {self.backend} worker cannot load its models: {self.problem}")
        if not self.ready:
            raise WorkerError(503, "loading", f"the {self.backend} worker is still loading its models")
        if config.backend != self.backend:
            raise WorkerError(
                503,
                "wrong_backend",
                f"this worker hosts backend '{self.backend}', not '{config.backend}' "
                f"(check CHORUS_BACKEND_URLS)",
            )
        try:
            return await self.pool.get(config)
        except ServingError as exc:
            raise WorkerError.of(exc) from exc

    async def healthz(self, request: Request) -> JSONResponse:
        body = {
            "status": "failed" if self.problem else "ready" if self.ready else "loading",
            "backend": self.backend,
            "models": [config.name for config in self.pool.loaded()],
            "failed": self.failures,
        }
        if self.problem:
            body["problem"] = self.problem
        return JSONResponse(body, status_code=200 if self.ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.pool.batches.exposition(), media_type="text/plain; version=0.0.4")

    async def voices(self, request: Request) -> Response:
        try:
            body = await _parse(request, VoicesBody)
            loaded = await self.loaded(body.config)
            return JSONResponse({"voices": loaded.backend.voices()})
        except WorkerError as exc:
            return exc.response()

    async def synthesize(self, request: Request) -> Response:
        try:
            body = await _parse(request, SynthesizeBody)
            loaded = await self.loaded(body.config)
            chunks = loaded.chunks(body.request)
            # Make the first chunk before answering, so that the request's own errors (an
            # unknown voice...) are sent as an error status rather than after a 200.
            try:
                first: Spoken = await anext(chunks)
            except StopAsyncIteration:
                first = b""
            except ServingError as exc:
                raise WorkerError.of(exc) from exc
        except WorkerError as exc:
            return exc.response()
        framed = body.request.word_times
        return StreamingResponse(
            _stream(first, chunks, framed),
            media_type=FRAMED_MEDIA_TYPE if framed else "application/octet-stream",
            headers={
                "X-Sample-Rate": str(loaded.backend.sample_rate),
                "X-Sample-Format": SAMPLE_FORMAT,
                "X-Channels": "1",
            },
        )


async def _stream(first: Spoken, rest: AsyncIterator[Spoken], framed: bool) -> AsyncIterator[bytes]:
    # Starlette cancels this when the client disconnects; closing `rest` then stops the backend
    # at its next chunk.
    async with aclosing(rest):
        if first:
            yield frame(first) if framed else first
        async for chunk in rest:
            yield frame(chunk) if framed else chunk


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise WorkerError(400, "invalid_request", "the request body is not valid JSON") from None
        where = ".".join(str(part) for part in error["loc"]) or None
        raise WorkerError(
            400, "invalid_request", f"'{where}': {error['msg']}" if where else error["msg"], where
        ) from None


def create_app(
    backend: str | None = None, configs_dir: Path | None = None, models_dir: Path | None = None
) -> Starlette:
    """The worker app for `backend` (default: $CHORUS_BACKEND)."""
    backend = backend or os.environ.get("CHORUS_BACKEND", "")
    worker = Worker(
        backend,
        configs_dir or Path(os.environ.get("CHORUS_CONFIGS_DIR") or "configs"),
        models_dir or Path(os.environ.get("CHORUS_MODELS_DIR") or "models"),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        loading = asyncio.create_task(worker.load_all())
        yield
        loading.cancel()

    app = Starlette(
        routes=[
            Route("/healthz", worker.healthz, methods=["GET"]),
            Route("/synthesize", worker.synthesize, methods=["POST"]),
            Route("/voices", worker.voices, methods=["POST"]),
            Route("/metrics", worker.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m functions.worker",
        description="Serve one Chorus backend over the worker protocol (what each backend image runs).",
    )
    parser.add_argument("--backend", default=os.environ.get("CHORUS_BACKEND"), choices=get_args(BackendName), help="backend to host (default: $CHORUS_BACKEND)")
    parser.add_argument("--host", default=os.environ.get("HOST") or "127.0.0.1", help="address to listen on (default: $HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or DEFAULT_PORT), help=f"port (default: $PORT or {DEFAULT_PORT})")
    parser.add_argument("--configs", type=Path, help="configs directory (default: $CHORUS_CONFIGS_DIR or configs)")
    parser.add_argument("--models", type=Path, help="models directory (default: $CHORUS_MODELS_DIR or models)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if not args.backend:
        parser.error("no backend: set CHORUS_BACKEND or pass --backend")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(args.backend, args.configs, args.models)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
