"""Docker mode: serverless on one Docker host, as Modal is in the cloud.

No worker runs until a request names a model of its backend (models with
`deploy.min_containers` start with the router and stay). The first such request starts the
backend's container from its image (`make images` builds them), waits until its /healthz says
ready, and then streams from it as http mode does; requests arriving meanwhile wait for that same
start. A worker idle for its backend's `deploy.scaledown_window` seconds is stopped and removed; a
worker that died is replaced by the next request. GPU workers share CHORUS_DOCKER_GPU_SLOTS: a
start that finds them full stops the least recently used idle GPU worker first, and waits (up to
the queue time-out, then 503 with Retry-After) while every one is busy.

The router holds the Docker socket, which is root on the host: it starts only Chorus's images for
the backends it knows, with the mounts, network and environment below, never any taken from a
config or a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
from anyio import to_thread

from functions import BACKENDS
from functions.config import DeploySettings, ModelConfig
from functions.protocol import SynthesisRequest
from functions.streams import released_by
from router.errors import BackendUnavailable, Overloaded
from router.metrics import Metrics
from router.runners import PcmStream
from router.runners.http import HttpRunner
from router.settings import Settings, SettingsError

log = logging.getLogger("chorus")

WORKER_PORT = 9000
#: Where the worker image reads configs and models (images/worker/Dockerfile).
CONFIGS_MOUNT = "/app/configs"
MODELS_MOUNT = "/models"
#: The user the worker image runs as (images/worker/Dockerfile's USER).
WORKER_UID = 10001
#: Lines of a failed worker's log written to the router's log (never to a client).
LOG_LINES = 30


@dataclass
class WorkerContainer:
    backend: str
    container: Any
    url: str
    uses_gpu_slot: bool
    #: Started for `deploy.min_containers`: never stopped while the router runs.
    kept: bool
    #: Requests streaming from it now.
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)


def _worker_can_read(path: Path) -> bool:
    """Whether the worker's user can read `path` (and list it, for a folder), by its mode bits
    alone: the class of owner, group or others that applies to that user."""
    info = path.stat()
    shift = 6 if info.st_uid == WORKER_UID else 3 if info.st_gid == WORKER_UID else 0
    needed = (stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)) << shift
    return info.st_mode & needed == needed


def _health_problem(response: httpx.Response) -> str | None:
    """What a worker's /healthz says keeps it from ever being ready, if it says so."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("problem") if isinstance(body, dict) and body.get("status") == "failed" else None


class DockerRunner(HttpRunner):
    def __init__(self, settings: Settings):
        super().__init__({}, connect_timeout=settings.backend_connect_timeout,
                         read_timeout=settings.backend_read_timeout,
                         health_interval=settings.backend_health_interval)
        self.settings = settings
        #: The engine's client, made on the first connection.
        self._engine: Any = None
        self._engine_problem: str | None = "not reached yet"
        self._configs: list[ModelConfig] = []
        self._workers: dict[str, WorkerContainer] = {}
        self._starts: dict[str, asyncio.Lock] = {}
        #: Backends holding a GPU slot: running, or starting.
        self._gpu_holders: set[str] = set()
        self._gpu_freed = asyncio.Event()
        #: backend -> requests using it now (Runner.hold), from their first chunk to their last.
        self._holds: dict[str, int] = {}
        self._mounts: dict[str, dict[str, str]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.metrics: Metrics | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRunner:
        """Refuses (SettingsError) configs a worker could not read: it would start, fail to load
        anything, and be started again for every request."""
        configs = settings.configs_dir
        for path in [configs, *sorted(configs.glob("*"))] if configs.is_dir() else []:
            if not _worker_can_read(path):
                mode = f"{path.stat().st_mode & 0o777:04o}"
                raise SettingsError(
                    f"docker mode: the workers run as uid {WORKER_UID} and could not read {path} (mode {mode}, "
                    f"owner uid {path.stat().st_uid}): make it readable by others (chmod o+r, and o+x for a "
                    f"folder) or owned by uid {WORKER_UID}")
        return cls(settings)

    def observe(self, metrics: Metrics) -> None:
        self.metrics = metrics

    # -- the engine ------------------------------------------------------------------------

    async def start(self, preload: list[ModelConfig]) -> None:
        self._configs = list(preload)
        try:
            await to_thread.run_sync(self._connect, True)
        except Exception as exc:
            self._engine_problem = f"the Docker engine cannot be reached ({exc})"
            log.error("docker mode: %s; every model answers 503", self._engine_problem)
        else:
            self._engine_problem = None
            for backend in sorted({c.backend for c in preload if c.deploy.min_containers}):
                try:
                    self._release(await self._acquire(backend))
                except BackendUnavailable as exc:
                    log.error("%s", exc.message)
        self._started = True
        self._monitor = asyncio.create_task(self._watch())
        self._reaper = asyncio.create_task(self._reap())

    def _connect(self, starting: bool = False) -> None:
        if self._engine is None:
            self._engine = docker.from_env()
        self._engine.ping()
        if starting:
            # Leftovers of a router of this project that did not stop cleanly.
            for container in self._engine.containers.list(all=True, filters={"label": self._project_label()}):
                container.remove(force=True)
        network = self.settings.docker_network
        if not self._engine.networks.list(names=[network]):
            self._engine.networks.create(network, driver="bridge", labels={"chorus.managed": "true"})
        self._mounts = self._worker_mounts()

    def _worker_mounts(self) -> dict[str, dict[str, str]]:
        """What the router itself sees at its configs and models directories: the same sources,
        from the host, or (for a router in a container) its own container's mounts."""
        own = self._own_container()

        def source(directory: Path) -> str:
            path = str(directory.resolve())
            if own is None:
                return path
            mount = next((m for m in own.attrs.get("Mounts", []) if m.get("Destination") == path), None)
            if mount is None:
                raise RuntimeError(f"the router's container mounts nothing at {path} for its workers to share")
            return mount.get("Name") or mount["Source"]

        return {
            source(self.settings.configs_dir): {"bind": CONFIGS_MOUNT, "mode": "ro"},
            source(self.settings.models_dir): {"bind": MODELS_MOUNT, "mode": "rw"},
        }

    def _own_container(self) -> Any:
        if not Path("/.dockerenv").exists():
            return None
        try:
            return self._engine.containers.get(socket.gethostname())
        except docker.errors.NotFound:
            return None

    def _project_label(self) -> str:
        return f"chorus.project={self.settings.docker_project}"

    def is_ready(self) -> bool:
        """Ready when the engine answers: workers start on demand."""
        return self._started and self._engine_problem is None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                # An engine that came back is set up again (network, mounts) before use.
                await to_thread.run_sync(self._connect if self._engine_problem else self._engine.ping)
                self._engine_problem = None
            except Exception as exc:
                self._engine_problem = f"the Docker engine cannot be reached ({exc})"
            await self._probe_all()

    # -- requests --------------------------------------------------------------------------

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        for attempt in (1, 2):
            worker = await self._acquire(config.backend)
            try:
                pcm = await super().stream(config, request)
            except BackendUnavailable:
                self._release(worker)
                # A worker that died since its last request: replaced once, as nothing was sent.
                if attempt == 1 and not await self._alive(worker):
                    await self._stop(worker, "it exited")
                    continue
                raise
            except BaseException:
                self._release(worker)
                raise
            break

        async def release() -> None:
            self._release(worker)

        return PcmStream(pcm.sample_rate, released_by(pcm.chunks, release))

    async def voices(self, config: ModelConfig) -> list[str] | None:
        """A running worker's voices; None for a backend none runs (a listing starts nothing)."""
        if config.backend not in self._workers:
            return None
        return await super().voices(config)

    def _url(self, backend: str) -> str:
        worker = self._workers.get(backend)
        if worker is None:
            raise BackendUnavailable(f"backend '{backend}' has no running worker")
        return worker.url

    async def _acquire(self, backend: str) -> WorkerContainer:
        if self._engine_problem is not None:
            raise BackendUnavailable(f"backend '{backend}' is unavailable: {self._engine_problem}")
        worker = self._workers.get(backend)
        if worker is not None and backend in self._problems and not await self._alive(worker):
            await self._stop(worker, "it exited")
            worker = None
        if worker is None:
            async with self._starts.setdefault(backend, asyncio.Lock()):
                worker = self._workers.get(backend) or await self._start_worker(backend)
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
        worker = self._workers.get(backend)
        if worker is None:
            return
        worker.last_used = time.monotonic()
        if worker.uses_gpu_slot and self._idle(worker):
            self._gpu_freed.set()

    def _idle(self, worker: WorkerContainer) -> bool:
        return not worker.active and not self._holds.get(worker.backend)

    # -- starting and stopping -------------------------------------------------------------

    def _backend_configs(self, backend: str) -> list[ModelConfig]:
        return [c for c in self._configs if c.backend == backend]

    def _uses_gpu(self, backend: str) -> bool:
        return any(c.deploy.gpu for c in self._backend_configs(backend))

    def _scaledown_window(self, backend: str) -> float:
        windows = [c.deploy.scaledown_window for c in self._backend_configs(backend)]
        return max(windows) if windows else DeploySettings().scaledown_window

    async def _start_worker(self, backend: str) -> WorkerContainer:
        gpu = self._uses_gpu(backend)
        if gpu:
            await self._take_gpu_slot(backend)
        started = time.perf_counter()
        try:
            container = await to_thread.run_sync(self._run_container, backend, gpu)
        except BaseException:
            self._gpu_holders.discard(backend)
            raise
        running = time.perf_counter()
        try:
            url = await self._wait_until_ready(backend, container)
        except BaseException as exc:
            self._gpu_holders.discard(backend)
            await to_thread.run_sync(self._log_and_remove, backend, container, str(exc))
            raise
        ready = time.perf_counter()
        kept = any(c.deploy.min_containers for c in self._backend_configs(backend))
        worker = WorkerContainer(backend, container, url, gpu, kept)
        self._workers[backend] = worker
        self.backend_urls[backend] = url
        self._set_health(backend, None)
        log.info("started a worker for backend '%s': container %.2f s, then ready in %.2f s",
                 backend, running - started, ready - running)
        if self.metrics is not None:
            self.metrics.cold_starts.labels(backend).inc()
            self.metrics.cold_start_seconds.labels(backend, "container").observe(running - started)
            self.metrics.cold_start_seconds.labels(backend, "ready").observe(ready - running)
            self.metrics.workers_running.labels(backend).set(1)
        return worker

    def _run_container(self, backend: str, gpu: bool) -> Any:
        if backend not in BACKENDS:  # a name from a request never reaches the engine unchecked
            raise BackendUnavailable(f"unknown backend '{backend}'")
        image = f"{self.settings.docker_image_prefix}{backend}"
        devices = []
        if gpu and not self.settings.docker_cpu_only:
            devices = [docker.types.DeviceRequest(driver="nvidia", count=1, capabilities=[["gpu"]])]
        try:
            # create, not run: run would try to pull an image that is not here.
            container = self._engine.containers.create(
                image,
                detach=True,
                name=f"{self.settings.docker_project}-{backend}-{uuid.uuid4().hex[:8]}",
                labels={"chorus.backend": backend, "chorus.managed": "true",
                        "chorus.project": self.settings.docker_project},
                network=self.settings.docker_network,
                volumes=self._mounts,
                environment={
                    "CHORUS_BACKEND": backend,
                    "CHORUS_CONFIGS_DIR": CONFIGS_MOUNT,
                    "CHORUS_MODELS_DIR": MODELS_MOUNT,
                    "CHORUS_CONFIGLESS_MODELS": str(self.settings.configless_models),
                    "HOST": "0.0.0.0",
                    "PORT": str(WORKER_PORT),
                },
                device_requests=devices,
            )
        except docker.errors.ImageNotFound:
            raise BackendUnavailable(
                f"backend '{backend}' cannot start: its image {image} is not built (make images)"
            ) from None
        except docker.errors.APIError as exc:
            log.error("creating a worker for backend '%s' failed: %s", backend, exc)
            raise BackendUnavailable(f"backend '{backend}' cannot start: the Docker engine refused "
                                     "its container (the router's log says why)") from None
        try:
            container.start()
        except docker.errors.APIError as exc:
            # A GPU asked of a host without one fails here.
            container.remove(force=True)
            log.error("starting a worker for backend '%s' failed: %s", backend, exc)
            raise BackendUnavailable(f"backend '{backend}' cannot start: the Docker engine could not "
                                     "start its container (the router's log says why)") from None
        return container

    async def _wait_until_ready(self, backend: str, container: Any) -> str:
        deadline = time.monotonic() + self.settings.docker_start_timeout
        url = None
        while time.monotonic() < deadline:
            await to_thread.run_sync(container.reload)
            if container.status in ("exited", "dead"):
                raise BackendUnavailable(f"backend '{backend}' cannot start: its worker exited "
                                         "(the router's log has its last lines)")
            address = container.attrs["NetworkSettings"]["Networks"].get(self.settings.docker_network, {})
            if address.get("IPAddress"):
                url = f"http://{address['IPAddress']}:{WORKER_PORT}"
                try:
                    response = await self.client.get(f"{url}/healthz", timeout=self._probe_timeout)
                    if response.status_code == 200:
                        return url
                    if (problem := _health_problem(response)) is not None:
                        log.error("the worker for backend '%s' cannot load its models: %s", backend, problem)
                        raise BackendUnavailable(f"backend '{backend}' cannot start: its worker cannot load its "
                                                 "models (the router's log says why)")
                except httpx.HTTPError:
                    pass  # not listening yet
            await asyncio.sleep(0.05)
        raise BackendUnavailable(
            f"backend '{backend}' cannot start: its worker was not ready within "
            f"{self.settings.docker_start_timeout:g} s (CHORUS_DOCKER_START_TIMEOUT)"
        )

    def _log_and_remove(self, backend: str, container: Any, why: str) -> None:
        try:
            tail = container.logs(tail=LOG_LINES).decode(errors="replace").rstrip()
        except Exception as exc:
            tail = f"(no log: {exc})"
        log.error("the worker for backend '%s' did not start: %s\n%s", backend, why, tail)
        container.remove(force=True)

    async def _take_gpu_slot(self, backend: str) -> None:
        """A GPU slot for `backend`: a free one, or the least recently used idle GPU worker's,
        or, while every one is busy, the first to come free within the queue time-out."""
        deadline = time.monotonic() + self.settings.queue_timeout
        while len(self._gpu_holders) >= self.settings.docker_gpu_slots:
            idle = [w for w in self._workers.values() if w.uses_gpu_slot and self._idle(w) and not w.kept]
            if idle:
                await self._stop(min(idle, key=lambda w: w.last_used), "its GPU slot is wanted")
                continue
            left = deadline - time.monotonic()
            self._gpu_freed.clear()
            try:
                await asyncio.wait_for(self._gpu_freed.wait(), max(0.0, left))
            except TimeoutError:
                raise Overloaded(
                    f"backend '{backend}' needs a GPU slot and all {self.settings.docker_gpu_slots} "
                    "are busy (CHORUS_DOCKER_GPU_SLOTS)",
                    retry_after=max(1, math.ceil(self.settings.queue_timeout)),
                    status=503,
                ) from None
        self._gpu_holders.add(backend)

    async def _alive(self, worker: WorkerContainer) -> bool:
        try:
            await to_thread.run_sync(worker.container.reload)
        except Exception:
            return False
        return worker.container.status == "running"

    async def _stop(self, worker: WorkerContainer, why: str) -> None:
        if self._workers.get(worker.backend) is worker:
            del self._workers[worker.backend]
            self.backend_urls.pop(worker.backend, None)
            self._problems.pop(worker.backend, None)
            self._forget_voices(worker.backend)
        log.info("stopping the worker for backend '%s': %s", worker.backend, why)
        try:
            await to_thread.run_sync(lambda: worker.container.remove(force=True))
        except Exception as exc:
            log.warning("removing the worker for backend '%s' failed: %s", worker.backend, exc)
        if worker.uses_gpu_slot:
            self._gpu_holders.discard(worker.backend)
            self._gpu_freed.set()
        if self.metrics is not None:
            self.metrics.workers_running.labels(worker.backend).set(0)

    async def _reap(self) -> None:
        """Stop each worker idle past its backend's scale-down window."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                idle = now - worker.last_used
                if not worker.kept and self._idle(worker) and idle > self._scaledown_window(worker.backend):
                    await self._stop(worker, f"idle for {idle:.0f} s (deploy.scaledown_window)")

    async def close(self) -> None:
        for task in (self._reaper, self._monitor):
            if task is not None:
                task.cancel()
        self._reaper = self._monitor = None
        for worker in list(self._workers.values()):
            await self._stop(worker, "the router is stopping")
        await super().close()
