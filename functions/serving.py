"""Serving loaded backends from an asyncio server: the router's local mode and the worker share it.

Each model config is loaded once, off the event loop, and gets its own concurrency limit. Its
PCM is pulled one chunk per thread hop, so a server whose client has gone away stops asking
the backend for more audio at the next chunk boundary. Whatever a backend raises, loading or
synthesising, comes out as one `ServingError`, classified here once for both servers. Once no
synthesis has run for a while, the memory past ones left behind is given back.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from anyio import CapacityLimiter, to_thread

from functions import create_backend
from functions.batch_metrics import BatchMetrics
from functions.batching import Batchable, Batcher
from functions.config import CONFIGLESS_MODELS, MEMORY_RELEASE_SECONDS, ModelConfig, redact
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    Spoken,
    SynthesisRequest,
    failure_code,
)
from functions.streams import END, one_by_one

log = logging.getLogger("chorus")
T = TypeVar("T")


class ServingError(Exception):
    """A backend's failure with its code (functions.protocol.FAILURES), as every host reports
    it: the worker answers it with the code's status, local mode and Modal raise it, and each
    runner turns the code into the router's error of that code."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(code, message, param)
        self.code, self.message, self.param = code, message, param

    def __str__(self) -> str:
        return self.message


def _load_failure(config: ModelConfig, exc: Exception, models_dir: Path) -> ServingError:
    message = redact(str(exc), models_dir)
    if not isinstance(exc, BackendError):
        # A corrupt weights file raises the library's own error: it fails this model's requests
        # clearly, without the machine's paths, and keeps the other models loading.
        message = f"model '{config.name}' failed to load: {message}"
    code = failure_code(exc)
    return ServingError(code, message, "model" if code == "model_not_found" else None)


class MemoryRelease:
    """Once no synthesis has run for `after` seconds, gives back what past ones left behind:
    each backend's own pools (`Backend.release_memory`), then the C heap's free pages. Neither
    shrinks by itself: ONNX Runtime keeps a session's arena at the largest size a run needed,
    and glibc keeps freed pages mapped in the arena of whichever thread freed them, so a server
    stayed at its busiest high-water mark for good (bench/memory.py). Once per idle spell, in a
    worker thread."""

    def __init__(self, after: float, backends: Callable[[], Iterable[Backend]]):
        self.after = after
        self._backends = backends
        #: Syntheses running now.
        self.running = 0
        #: Idle spells whose memory was given back.
        self.releases = 0
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Future[None] | None = None

    def started(self) -> None:
        self.running += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def ended(self) -> None:
        self.running -= 1
        if self.running:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a stream finalised after its loop closed: nothing is served any more
        self._timer = loop.call_later(self.after, self._release)

    def _release(self) -> None:
        self._timer = None
        if self.running or self._releasing is not None:
            return
        self._releasing = asyncio.get_running_loop().run_in_executor(None, self._give_back)
        self._releasing.add_done_callback(self._released)

    def _give_back(self) -> None:
        for backend in list(self._backends()):
            try:
                backend.release_memory()
            except Exception as exc:  # noqa: BLE001 - memory not given back fails no request
                log.warning("backend '%s' did not give its memory back: %s", backend.name, exc)
        trim_heap()

    def _released(self, done: asyncio.Future[None]) -> None:
        self._releasing = None
        if not done.cancelled() and done.exception() is None:
            self.releases += 1


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim); nothing where the C
    library has no such call (musl, macOS)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass
class LoadedBackend:
    backend: Backend
    limiter: CapacityLimiter
    #: Told when each synthesis starts and ends.
    memory: MemoryRelease | None = None
    #: For a backend that generates batches: its chunks of text go through it.
    batcher: Batcher | None = None

    async def chunks(self, request: SynthesisRequest) -> AsyncIterator[Spoken]:
        """The backend's PCM chunks (and word times, where asked for); what the backend raises
        comes out as a `ServingError`."""
        if self.memory is not None:
            self.memory.started()
        try:
            if self.batcher is not None:
                prepared = await to_thread.run_sync(self.batcher.backend.prepare, request, limiter=self.limiter)
                if pcm := await self.batcher.generate(prepared):
                    yield pcm
                return
            # aclosing: the backend's generator is closed when this stops, not when collected.
            async with aclosing(in_threads(self.backend.synthesize(request), self.limiter)) as pcm:
                async for chunk in pcm:
                    if chunk:
                        yield chunk
        except InvalidRequestError as exc:
            raise ServingError(failure_code(exc), str(exc), exc.param) from exc
        except Exception as exc:
            raise ServingError(failure_code(exc), f"backend '{self.backend.name}' failed: {exc}") from exc
        finally:
            if self.memory is not None:
                self.memory.ended()


def in_threads(items: Iterator[T], limiter: CapacityLimiter | None = None) -> AsyncIterator[T]:
    """A blocking iterator's items, each fetched in a worker thread so the event loop stays
    free; closed (in a thread too: a backend's close may wait on a lock or the network) when the
    consumer stops. One item per hop: a consumer that is cancelled between hops (a client that
    disconnected) asks for nothing more."""
    close = getattr(items, "close", None)

    async def close_items() -> None:
        if close is not None:
            await to_thread.run_sync(close)

    return one_by_one(lambda: to_thread.run_sync(next, items, END, limiter=limiter), close_items, interrupt=False)


def configless_limit() -> int:
    """CHORUS_CONFIGLESS_MODELS, for a worker (the router reads it into its settings)."""
    raw = os.environ.get("CHORUS_CONFIGLESS_MODELS", "").strip()
    return int(raw) if raw else CONFIGLESS_MODELS


def memory_release_seconds() -> float:
    """CHORUS_MEMORY_RELEASE_SECONDS, for a worker (the router reads it into its settings)."""
    raw = os.environ.get("CHORUS_MEMORY_RELEASE_SECONDS", "").strip()
    return float(raw) if raw else MEMORY_RELEASE_SECONDS


class BackendPool:
    """Backends by model config, each loaded on first use (or by `get` at start-up). Config-less
    models are kept up to `configless` at once, the least recently used unloaded first. Every
    host serves its backends through one: local mode, the worker and each Modal container.

    With `on_device` False, backends stay in host memory until `to_device()` (a Modal container
    loads before its memory snapshot, where no GPU is attached). `release_after` seconds after
    the last synthesis ends, with none begun since, what they left in memory is given back."""

    def __init__(self, models_dir: Path, configless: int = CONFIGLESS_MODELS, on_device: bool = True,
                 release_after: float = MEMORY_RELEASE_SECONDS):
        self.models_dir = models_dir
        self.configless = configless
        self.on_device = on_device
        self._loaded: dict[str, LoadedBackend] = {}
        self.memory = MemoryRelease(release_after, lambda: [entry.backend for entry in self._loaded.values()])
        self.batches = BatchMetrics()
        self._locks: dict[str, asyncio.Lock] = {}
        #: Keys of the loaded config-less models, least recently used first.
        self._configless: OrderedDict[str, None] = OrderedDict()

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
        key = self._use(config)
        if key in self._loaded:
            return self._loaded[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._loaded:
                try:
                    # Off the event loop, importing the backend's libraries included: they can
                    # take seconds, during which health checks must still be answered.
                    self._add(key, config, await to_thread.run_sync(self._load, config))
                except ServingError:
                    # Not kept for a model that is not there: a LocalAI client may name any file.
                    self._locks.pop(key, None)
                    raise
        return self._loaded[key]

    def load(self, config: ModelConfig) -> LoadedBackend:
        """`get` for a host with no event loop running yet (a Modal container's start): blocks."""
        key = self._use(config)
        if key not in self._loaded:
            self._add(key, config, self._load(config))
        return self._loaded[key]

    def to_device(self) -> None:
        """Move the loaded backends to the GPU where there is one; later loads go there at once."""
        self.on_device = True
        for entry in self._loaded.values():
            entry.backend.to_device()

    def _use(self, config: ModelConfig) -> str:
        key = self._key(config)
        if config.configless:
            if not self.configless:
                raise ServingError("model_not_found", f"model '{config.name}' is no config, and "
                                   "config-less models are switched off (CHORUS_CONFIGLESS_MODELS=0)", "model")
            if key in self._configless:
                self._configless.move_to_end(key)
        return key

    def _load(self, config: ModelConfig) -> Backend:
        try:
            backend = create_backend(config, self.models_dir)
            backend.load()
            if self.on_device:
                backend.to_device()
        except Exception as exc:
            raise _load_failure(config, exc, self.models_dir) from exc
        return backend

    def _add(self, key: str, config: ModelConfig, backend: Backend) -> None:
        # Past this many concurrent requests, more threads only fight over the cores.
        deploy = config.deploy
        batcher = None
        if isinstance(backend, Batchable):
            batcher = Batcher(backend, deploy.max_batch_size, deploy.batch_wait_ms / 1000,
                              self.batches.observer(config.name))
        self._loaded[key] = LoadedBackend(backend, CapacityLimiter(deploy.max_concurrent_inputs), self.memory, batcher)
        if config.configless:
            self._keep_configless(key)

    def _keep_configless(self, key: str) -> None:
        self._configless[key] = None
        while len(self._configless) > self.configless:
            evicted, _ = self._configless.popitem(last=False)
            # Requests still streaming from it keep it until they end; the pool lets it go.
            unloaded = self._loaded.pop(evicted)
            self._locks.pop(evicted, None)
            log.info("unloaded config-less model '%s' (%d kept at most)", unloaded.backend.config.name,
                     self.configless)
