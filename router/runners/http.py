"""Http mode: each backend runs in its own worker process (its container in docker compose),
at a URL given in CHORUS_BACKEND_URLS, reached over the worker protocol (worker_client.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import get_args

from functions.config import BackendName, ConfigError, ModelConfig
from functions.protocol import SynthesisRequest
from router.errors import BackendUnavailable
from router.runners import PcmStream, Runner
from router.runners.worker_client import WorkerClient
from router.settings import Settings

log = logging.getLogger("chorus")


class HttpRunner(Runner):
    def __init__(
        self,
        backend_urls: dict[str, str],
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        health_interval: float = 5.0,
    ):
        for name, url in backend_urls.items():
            if name not in get_args(BackendName):
                raise ConfigError(
                    f"CHORUS_BACKEND_URLS: unknown backend '{name}'; known: "
                    f"{', '.join(get_args(BackendName))}"
                )
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"CHORUS_BACKEND_URLS: '{name}={url}' is not an http(s) URL")
        self.backend_urls = {name: url.rstrip("/") for name, url in backend_urls.items()}
        self.health_interval = health_interval
        self.workers = WorkerClient(self._health, connect_timeout=connect_timeout, read_timeout=read_timeout)
        #: backend -> why its worker cannot serve now; a backend absent from it is healthy.
        self._problems: dict[str, str] = {name: "not probed yet" for name in self.backend_urls}
        self._needed: set[str] = set()
        #: backends whose worker has answered healthy since start
        self._seen: set[str] = set()
        self._started = False
        self._monitor: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpRunner:
        return cls(
            settings.backend_urls,
            connect_timeout=settings.backend_connect_timeout,
            read_timeout=settings.backend_read_timeout,
            health_interval=settings.backend_health_interval,
        )

    async def start(self, preload: list[ModelConfig]) -> None:
        backends = {config.backend for config in preload}
        self._needed = backends & self.backend_urls.keys()
        for name in sorted(backends - self.backend_urls.keys()):
            log.warning(
                "backend '%s' has no worker URL in CHORUS_BACKEND_URLS; its models answer 503", name
            )
        await self._probe_all()
        self._started = True
        self._monitor = asyncio.create_task(self._watch())

    def is_ready(self) -> bool:
        """A configured model's worker answers healthy, and none that has answered since start is
        down now. A worker never reached is a service this deployment does not run (compose's
        default profile names the GPU backends' URLs but starts none of them): its models answer
        503, and it holds nothing back."""
        healthy = self._needed - self._problems.keys()
        return self._started and bool(healthy) and not (self._needed & self._seen & self._problems.keys())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self._probe_all()

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self.workers.health(name, url) for name, url in self.backend_urls.items()))

    def _health(self, backend: str, problem: str | None) -> None:
        before = self._problems.get(backend)
        if problem is None:
            self._seen.add(backend)
            self._problems.pop(backend, None)
            if before is not None:
                log.info("backend '%s' is ready", backend)
        else:
            self._problems[backend] = problem
            if before is None:
                log.warning("backend '%s' is unavailable: %s", backend, problem)

    def _url(self, backend: str) -> str:
        try:
            return self.backend_urls[backend]
        except KeyError:
            raise BackendUnavailable(
                f"backend '{backend}' has no worker: add it to CHORUS_BACKEND_URLS "
                f"(e.g. {backend}=http://{backend}:9000)"
            ) from None

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        return await self.workers.stream(config.backend, self._url(config.backend), config, request)

    async def voices(self, config: ModelConfig) -> list[str]:
        return await self.workers.voices(config.backend, self._url(config.backend), config)

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        await self.workers.close()
