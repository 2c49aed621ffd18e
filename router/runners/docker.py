"""Docker mode: serverless on one Docker host, as Modal is in the cloud.

No worker runs until a request names a model of its backend (models with
`deploy.min_containers` start with the router and stay). The first such request starts the
backend's container from its image (`make images` builds them), waits until its /healthz says
ready, and then streams from it as http mode does; requests arriving meanwhile wait for that same
start. A worker idle for its backend's `deploy.scaledown_window` seconds is stopped and removed; a
worker that died is replaced by the next request. GPU workers share CHORUS_DOCKER_GPU_SLOTS: a
start that finds them full stops the least recently used idle GPU worker first, and waits (up to
the queue time-out, then 503 with Retry-After) while every one is busy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from functions.config import DeploySettings, ModelConfig
from functions.protocol import SynthesisRequest
from functions.streams import released_by
from router.errors import BackendUnavailable, Overloaded
from router.metrics import Metrics
from router.runners import PcmStream, Runner
from router.runners.containers import Engine, WorkerContainer, check_readable
from router.runners.worker_client import WorkerClient
from router.settings import Settings

log = logging.getLogger("chorus")


class GpuSlots:
    """CHORUS_DOCKER_GPU_SLOTS: the GPU workers that may run, or be starting, at once."""

    def __init__(self, slots: int, queue_timeout: float):
        self.slots = slots
        self.queue_timeout = queue_timeout
        self.holders: set[str] = set()
        self._changed = asyncio.Event()

    async def take(self, backend: str, stop_idle: Callable[[], Awaitable[bool]]) -> None:
        """A slot for `backend`: a free one, or one `stop_idle` frees by stopping an idle GPU
        worker, or, while every one is busy, the first to come free within the queue time-out."""
        deadline = time.monotonic() + self.queue_timeout
        while len(self.holders) >= self.slots:
            if await stop_idle():
                continue
            self._changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._changed.wait()
            except TimeoutError:
                raise Overloaded(
                    f"backend '{backend}' needs a GPU slot and all {self.slots} are busy (CHORUS_DOCKER_GPU_SLOTS)",
                    retry_after=max(1, math.ceil(self.queue_timeout)),
                    status=503,
                ) from None
        self.holders.add(backend)

    def give_back(self, backend: str) -> None:
        self.holders.discard(backend)
        self.wake()

    def wake(self) -> None:
        """A slot came free, or its worker became idle: waiting starts look again."""
        self._changed.set()


class DockerRunner(Runner):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = Engine(settings)
        self.workers = WorkerClient(self._health, connect_timeout=settings.backend_connect_timeout,
                                    read_timeout=settings.backend_read_timeout)
        self._configs: list[ModelConfig] = []
        self._running: dict[str, WorkerContainer] = {}
        #: Running backends whose worker's last answer was a failure: checked before next use.
        self._troubled: set[str] = set()
        self._starts: dict[str, asyncio.Lock] = {}
        self.gpu_slots = GpuSlots(settings.docker_gpu_slots, settings.queue_timeout)
        #: backend -> requests using it now (Runner.hold), from their first chunk to their last.
        self._holds: dict[str, int] = {}
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        #: The app's, once it observes this runner.
        self.metrics = Metrics()

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRunner:
        check_readable(settings.configs_dir)
        return cls(settings)

    def observe(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def start(self, preload: list[ModelConfig]) -> None:
        self._configs = list(preload)
        await self.engine.check(starting=True)
        if self.engine.problem is not None:
            log.error("docker mode: %s; every model answers 503", self.engine.problem)
        for backend in sorted({c.backend for c in preload if c.deploy.min_containers}):
            try:
                self._release(await self._acquire(backend))
            except BackendUnavailable as exc:
                log.error("%s", exc.message)
        self._started = True
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._reap())]

    def is_ready(self) -> bool:
        """Ready when the engine answers: workers start on demand."""
        return self._started and self.engine.problem is None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.backend_health_interval)
            await self.engine.check()
            await asyncio.gather(*(self.workers.health(w.backend, w.url) for w in list(self._running.values())))

    def _health(self, backend: str, problem: str | None) -> None:
        if backend not in self._running:
            return  # a worker still starting: its start waits for it
        if problem is None:
            self._troubled.discard(backend)
        elif backend not in self._troubled:
            self._troubled.add(backend)
            log.warning("backend '%s' is unavailable: %s", backend, problem)

    # -- requests --------------------------------------------------------------------------

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        for attempt in (1, 2):
            worker = await self._acquire(config.backend)
            try:
                pcm = await self.workers.stream(worker.backend, worker.url, config, request)
            except BackendUnavailable:
                self._release(worker)
                # A worker that died since its last request: replaced once, as nothing was sent.
                if attempt == 1 and not await self.engine.alive(worker.container):
                    await self._stop(worker, "it exited")
                    continue
                raise
            except BaseException:
                self._release(worker)
                raise
            break

        async def release() -> None:
            self._release(worker)

        return PcmStream(pcm.sample_rate, released_by(pcm.audio, release))

    async def voices(self, config: ModelConfig) -> list[str] | None:
        """A running worker's voices; None for a backend none runs (a listing starts nothing)."""
        worker = self._running.get(config.backend)
        return None if worker is None else await self.workers.voices(worker.backend, worker.url, config)

    async def _acquire(self, backend: str) -> WorkerContainer:
        if self.engine.problem is not None:
            raise BackendUnavailable(f"backend '{backend}' is unavailable: {self.engine.problem}")
        worker = self._running.get(backend)
        if worker is not None and backend in self._troubled and not await self.engine.alive(worker.container):
            await self._stop(worker, "it exited")
            worker = None
        if worker is None:
            async with self._starts.setdefault(backend, asyncio.Lock()):
                worker = self._running.get(backend) or await self._start_worker(backend)
        worker.active += 1
        worker.last_used = time.monotonic()
        return worker

    def _release(self, worker: WorkerContainer) -> None:
        worker.active -= 1
        self._used(worker.backend)

    def hold(self, config: ModelConfig) -> Callable[[], None]:
        backend = config.backend
        self._holds[backend] = self._holds.get(backend, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._holds[backend] -= 1
                self._used(backend)

        return release

    def _used(self, backend: str) -> None:
        worker = self._running.get(backend)
        if worker is None:
            return
        worker.last_used = time.monotonic()
        if worker.uses_gpu_slot and self._idle(worker):
            self.gpu_slots.wake()

    def _idle(self, worker: WorkerContainer) -> bool:
        return not worker.active and not self._holds.get(worker.backend)

    # -- starting and stopping -------------------------------------------------------------

    async def _start_worker(self, backend: str) -> WorkerContainer:
        configs = [c for c in self._configs if c.backend == backend]
        gpu = any(c.deploy.gpu for c in configs)
        if gpu:
            await self.gpu_slots.take(backend, self._stop_an_idle_gpu_worker)
        started = time.perf_counter()
        try:
            container = await self.engine.run(backend, gpu)
            running = time.perf_counter()
            try:
                url = await self.engine.wait_until_ready(backend, container, self.workers.health)
            except BaseException as exc:
                await self.engine.remove(backend, container, why=str(exc))
                raise
        except BaseException:
            if gpu:
                self.gpu_slots.give_back(backend)
            raise
        ready = time.perf_counter()
        window = max((c.deploy.scaledown_window for c in configs), default=DeploySettings().scaledown_window)
        kept = any(c.deploy.min_containers for c in configs)
        worker = WorkerContainer(backend, container, url, gpu, kept, window)
        self._running[backend] = worker
        log.info("started a worker for backend '%s': container %.2f s, then ready in %.2f s",
                 backend, running - started, ready - running)
        self.metrics.cold_start(backend, running - started, ready - running)
        return worker

    async def _stop_an_idle_gpu_worker(self) -> bool:
        idle = [w for w in self._running.values() if w.uses_gpu_slot and self._idle(w) and not w.kept]
        if idle:
            await self._stop(min(idle, key=lambda w: w.last_used), "its GPU slot is wanted")
        return bool(idle)

    async def _stop(self, worker: WorkerContainer, why: str) -> None:
        if self._running.get(worker.backend) is worker:
            del self._running[worker.backend]
            self._troubled.discard(worker.backend)
            self.workers.forget(worker.backend)
        log.info("stopping the worker for backend '%s': %s", worker.backend, why)
        await self.engine.remove(worker.backend, worker.container)
        if worker.uses_gpu_slot:
            self.gpu_slots.give_back(worker.backend)
        self.metrics.workers_running.labels(worker.backend).set(0)

    async def _reap(self) -> None:
        """Stop each worker idle past its backend's scale-down window."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for worker in list(self._running.values()):
                if not worker.kept and self._idle(worker) and now - worker.last_used > worker.scaledown_window:
                    await self._stop(worker, f"idle for {now - worker.last_used:.0f} s (deploy.scaledown_window)")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for worker in list(self._running.values()):
            await self._stop(worker, "the router is stopping")
        await self.workers.close()
