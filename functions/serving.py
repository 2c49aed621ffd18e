"""Serving loaded backends from an asyncio server: the router's local mode and the worker share it.

Each model config is loaded once, off the event loop, and gets its own concurrency limit. Its
PCM is pulled one chunk per thread hop, so a server whose client has gone away stops asking
the backend for more audio at the next chunk boundary. Whatever a backend raises, loading or
synthesising, comes out as one `ServingError`, classified here once for both servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anyio import CapacityLimiter, to_thread

from functions import create_backend
from functions.config import ModelConfig, redact
from functions.protocol import (
    Backend,
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    SynthesisRequest,
)

#: What went wrong, as the worker protocol's error codes (and the router's) spell it.
FailureKind = Literal["invalid_request", "backend_unavailable", "synthesis_failed"]


class ServingError(Exception):
    """A backend's failure, as the worker answers it (400, 503 or 500 with `kind` as its code)
    and as the router's local mode raises it (its error of the same code)."""

    def __init__(self, kind: FailureKind, message: str, param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param


def _load_failure(config: ModelConfig, exc: Exception, models_dir: Path) -> ServingError:
    if isinstance(exc, BackendUnavailableError):
        return ServingError("backend_unavailable", str(exc))
    if isinstance(exc, BackendError):
        return ServingError("synthesis_failed", str(exc))
    # A corrupt weights file raises the library's own error: it fails this model's requests
    # clearly, without the machine's paths, and keeps the other models loading.
    return ServingError(
        "synthesis_failed", f"model '{config.name}' failed to load: {redact(str(exc), models_dir)}"
    )


@dataclass
class LoadedBackend:
    backend: Backend
    limiter: CapacityLimiter

    async def chunks(self, request: SynthesisRequest) -> AsyncIterator[bytes]:
        """The backend's PCM chunks; what the backend raises comes out as a `ServingError`."""
        generator = self.backend.synthesize(request)
        hop: asyncio.Future[bytes | None] | None = None
        try:
            while True:
                # One chunk per thread hop: between hops a cancelled request (a client that
                # disconnected) stops here, so no further audio is made for it.
                hop = asyncio.ensure_future(
                    to_thread.run_sync(next, generator, None, limiter=self.limiter)
                )
                try:
                    chunk = await asyncio.shield(hop)
                except InvalidRequestError as exc:
                    raise ServingError("invalid_request", str(exc), exc.param) from exc
                except Exception as exc:
                    raise ServingError(
                        "synthesis_failed", f"backend '{self.backend.name}' failed: {exc}"
                    ) from exc
                if chunk is None:
                    return
                if chunk:
                    yield chunk
        finally:
            if hop is None or hop.done():
                generator.close()
            else:
                # Cancelled mid-hop: asyncio's cancellation does not wait for the thread, which
                # is still inside the generator. Closing it under that thread crashed the
                # interpreter; close it once the thread is out.
                hop.add_done_callback(lambda done: _close_after(done, generator))


def _close_after(hop: asyncio.Future[bytes | None], generator: Iterator[bytes]) -> None:
    if not hop.cancelled():
        hop.exception()  # retrieved: the request that wanted the chunk is gone
    generator.close()


class BackendPool:
    """Backends by model config, each loaded on first use (or by `get` at start-up)."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._loaded: dict[str, LoadedBackend] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def _key(config: ModelConfig) -> str:
        # The whole config, not only its name: a request may override the backend or name a
        # model file, and a worker may be sent a config that differs from its own copy.
        return config.model_dump_json()

    def loaded(self) -> list[ModelConfig]:
        return [entry.backend.config for entry in self._loaded.values()]

    async def get(self, config: ModelConfig) -> LoadedBackend:
        """The loaded backend for `config`. A failure to import or load it is a `ServingError`,
        and the next call tries again."""
        key = self._key(config)
        if key in self._loaded:
            return self._loaded[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._loaded:
                # Off the event loop, importing the backend's libraries included: they can take
                # seconds, during which health checks must still be answered.
                try:
                    backend = await to_thread.run_sync(_create_and_load, config, self.models_dir)
                except Exception as exc:
                    raise _load_failure(config, exc, self.models_dir) from exc
                # Past this many concurrent requests, more threads only fight over the cores.
                limiter = CapacityLimiter(config.deploy.max_concurrent_inputs)
                self._loaded[key] = LoadedBackend(backend, limiter)
        return self._loaded[key]


def _create_and_load(config: ModelConfig, models_dir: Path) -> Backend:
    backend = create_backend(config, models_dir)
    backend.load()
    return backend
