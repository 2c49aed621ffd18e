"""Local mode: backends run inside the router's own process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from functions.config import CONFIGLESS_MODELS, MEMORY_RELEASE_SECONDS, ModelConfig
from functions.protocol import SynthesisRequest
from functions.serving import BackendPool, LoadedBackend, ServingError
from router.errors import ChorusError, backend_error
from router.metrics import Metrics
from router.runners import PcmStream, Runner

log = logging.getLogger("chorus")


def _error(config: ModelConfig, failure: ServingError) -> ChorusError:
    return backend_error(config.backend, failure.code, failure.message, failure.param)


class InProcessRunner(Runner):
    """Local mode: backends live in this process; their blocking calls run in worker threads
    so the event loop (and /healthz) stays responsive during synthesis."""

    def __init__(self, models_dir: Path, configless: int = CONFIGLESS_MODELS,
                 release_after: float = MEMORY_RELEASE_SECONDS):
        self._pool = BackendPool(models_dir, configless, release_after=release_after)
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

    def observe(self, metrics: Metrics) -> None:
        metrics.add_batches(self._pool.batches)

    async def _backend(self, config: ModelConfig) -> LoadedBackend:
        try:
            return await self._pool.get(config)
        except ServingError as exc:
            raise _error(config, exc) from exc

    async def voices(self, config: ModelConfig) -> list[str]:
        return (await self._backend(config)).backend.voices()

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        loaded = await self._backend(config)
        return PcmStream(loaded.backend.sample_rate, self._audio(config, loaded, request))

    @staticmethod
    async def _audio(config: ModelConfig, loaded: LoadedBackend, request: SynthesisRequest) -> AsyncIterator[bytes]:
        try:
            # aclosing: a consumer that stops early closes the backend's generator now, not
            # whenever the garbage collector gets to it.
            async with aclosing(loaded.chunks(request)) as audio:
                async for pcm in audio:
                    yield pcm
        except ServingError as exc:
            raise _error(config, exc) from exc
