"""Docker mode's worker containers on the Docker engine: created, started, waited on until ready,
and removed. What runs when is docker.py's to decide.

The router holds the Docker socket, which is root on the host: it starts only Chorus's images for
the backends it knows, with the mounts, network and environment below, never any taken from a
config or a request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from anyio import to_thread

from functions import BACKENDS
from router.errors import BackendUnavailable
from router.runners.worker_client import WorkerHealth
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
    #: Idle this long, it is stopped: its backend's longest `deploy.scaledown_window`.
    scaledown_window: float
    #: Requests streaming from it now.
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)


def check_readable(configs: Path) -> None:
    """Refuses (SettingsError) configs a worker could not read: it would start, fail to load
    anything, and be started again for every request."""
    for path in [configs, *sorted(configs.glob("*"))] if configs.is_dir() else []:
        if not _worker_can_read(path):
            info = path.stat()
            raise SettingsError(
                f"docker mode: the workers run as uid {WORKER_UID} and could not read {path} (mode "
                f"{info.st_mode & 0o777:04o}, owner uid {info.st_uid}): make it readable by others (chmod o+r, "
                f"and o+x for a folder) or owned by uid {WORKER_UID}")


def _worker_can_read(path: Path) -> bool:
    """By the mode bits alone: the class of owner, group or others that applies to the worker."""
    info = path.stat()
    shift = 6 if info.st_uid == WORKER_UID else 3 if info.st_gid == WORKER_UID else 0
    needed = (stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)) << shift
    return info.st_mode & needed == needed


class Engine:
    """The Docker engine, as far as this router's workers need it. Its calls block: each is
    run off the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: Any = None
        self._mounts: dict[str, dict[str, str]] = {}
        #: Why the engine cannot be used now; None while it answers.
        self.problem: str | None = "not reached yet"

    async def check(self, starting: bool = False) -> None:
        """Reach the engine; one that was unreachable is set up again (network, mounts) first."""
        try:
            if starting or self.problem is not None:
                await to_thread.run_sync(self._connect, starting)
            else:
                await to_thread.run_sync(self._client.ping)
        except Exception as exc:
            self.problem = f"the Docker engine cannot be reached ({exc})"
        else:
            self.problem = None

    def _connect(self, starting: bool) -> None:
        if self._client is None:
            self._client = docker.from_env()
        self._client.ping()
        if starting:
            # Leftovers of a router of this project that did not stop cleanly.
            label = f"chorus.project={self.settings.docker_project}"
            for container in self._client.containers.list(all=True, filters={"label": label}):
                container.remove(force=True)
        network = self.settings.docker_network
        if not self._client.networks.list(names=[network]):
            self._client.networks.create(network, driver="bridge", labels={"chorus.managed": "true"})
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
            return self._client.containers.get(socket.gethostname())
        except docker.errors.NotFound:
            return None

    async def run(self, backend: str, gpu: bool) -> Any:
        return await to_thread.run_sync(self._run, backend, gpu)

    def _run(self, backend: str, gpu: bool) -> Any:
        if backend not in BACKENDS:  # a name from a request never reaches the engine unchecked
            raise BackendUnavailable(f"unknown backend '{backend}'")
        image = f"{self.settings.docker_image_prefix}{backend}"
        devices = []
        if gpu and not self.settings.docker_cpu_only:
            devices = [docker.types.DeviceRequest(driver="nvidia", count=1, capabilities=[["gpu"]])]
        try:
            # create, not run: run would try to pull an image that is not here.
            container = self._client.containers.create(
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

    async def wait_until_ready(
        self, backend: str, container: Any, health: Callable[[str, str], Awaitable[WorkerHealth]]
    ) -> str:
        """The worker's URL, once `health` finds it ready."""
        deadline = time.monotonic() + self.settings.docker_start_timeout
        while time.monotonic() < deadline:
            await to_thread.run_sync(container.reload)
            if container.status in ("exited", "dead"):
                raise BackendUnavailable(f"backend '{backend}' cannot start: its worker exited "
                                         "(the router's log has its last lines)")
            address = container.attrs["NetworkSettings"]["Networks"].get(self.settings.docker_network, {})
            if address.get("IPAddress"):
                url = f"http://{address['IPAddress']}:{WORKER_PORT}"
                answer = await health(backend, url)
                if answer.problem is None:
                    return url
                if answer.failed:
                    log.error("the worker for backend '%s': %s", backend, answer.problem)
                    raise BackendUnavailable(f"backend '{backend}' cannot start: its worker cannot load its "
                                             "models (the router's log says why)")
            await asyncio.sleep(0.05)  # not listening yet: the engine has no event for that
        raise BackendUnavailable(
            f"backend '{backend}' cannot start: its worker was not ready within "
            f"{self.settings.docker_start_timeout:g} s (CHORUS_DOCKER_START_TIMEOUT)"
        )

    async def alive(self, container: Any) -> bool:
        try:
            await to_thread.run_sync(container.reload)
        except Exception:
            return False
        return container.status == "running"

    async def remove(self, backend: str, container: Any, why: str | None = None) -> None:
        """Remove the container; with `why`, it failed to start: its last lines go to the log."""
        def remove() -> None:
            if why is not None:
                try:
                    tail = container.logs(tail=LOG_LINES).decode(errors="replace").rstrip()
                except Exception as exc:
                    tail = f"(no log: {exc})"
                log.error("the worker for backend '%s' did not start: %s\n%s", backend, why, tail)
            container.remove(force=True)

        try:
            await to_thread.run_sync(remove)
        except Exception as exc:
            log.warning("removing the worker for backend '%s' failed: %s", backend, exc)
