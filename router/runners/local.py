"""Local mode: backends run inside the router's own process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from anyio import CapacityLimiter, to_thread

from functions import create_backend
from functions.config import ModelConfig
from functions.protocol import (
    Backend,
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    SynthesisRequest,
)
from router.errors import BackendUnavailable, ChorusError, InvalidRequest, SynthesisFailed
from router.runners import PcmStream, Runner

log = logging.getLogger("chorus")


class InProcessRunner(Runner):
    """Local mode: backends live in this process; their blocking calls run in worker threads
    so the event loop (and /healthz) stays responsive during synthesis."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._backends: dict[tuple[str, str], tuple[Backend, CapacityLimiter]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._ready = False

    async def start(self, preload: list[ModelConfig]) -> None:
        for config in preload:
            try:
                await self._backend(config)
            except ChorusError as exc:
                # One model that cannot load (a backend not installed in this environment, a
                # missing file) must not keep the others from serving; its requests get the error.
                log.warning("model '%s' is not loaded: %s", config.name, exc.message)
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready

    async def _backend(self, config: ModelConfig) -> tuple[Backend, CapacityLimiter]:
        key = (config.name, config.backend)
        if key in self._backends:
            return self._backends[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._backends:
                try:
                    backend = create_backend(config, self.models_dir)
                    await to_thread.run_sync(backend.load)
                except BackendUnavailableError as exc:
                    raise BackendUnavailable(str(exc)) from exc
                except BackendError as exc:
                    raise SynthesisFailed(str(exc)) from exc
                # Past this many concurrent requests, more threads only fight over the cores.
                limiter = CapacityLimiter(config.deploy.max_concurrent_inputs)
                self._backends[key] = (backend, limiter)
        return self._backends[key]

    async def voices(self, config: ModelConfig) -> list[str]:
        backend, _ = await self._backend(config)
        return backend.voices()

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        backend, limiter = await self._backend(config)
        return PcmStream(backend.sample_rate, self._chunks(backend, limiter, request))

    @staticmethod
    async def _chunks(
        backend: Backend, limiter: CapacityLimiter, request: SynthesisRequest
    ) -> AsyncIterator[bytes]:
        generator = backend.synthesize(request)
        try:
            while True:
                # One chunk per thread hop: between hops a disconnected client's request is
                # cancelled, so no further audio is made for it.
                chunk = await to_thread.run_sync(next, generator, None, limiter=limiter)
                if chunk is None:
                    return
                if chunk:
                    yield chunk
        except InvalidRequestError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except ChorusError:
            raise
        except Exception as exc:
            raise SynthesisFailed(f"backend '{backend.name}' failed: {exc}") from exc
        finally:
            generator.close()
