"""Modal mode: each backend is a class of the deployed Modal app (infra/modal_app.py), looked up
by name and instantiated with the model's name, so Modal starts containers for a model only when
a request names it.

The class's `describe()` gives the PCM rate and voices (cached: they do not change while a model
is deployed) and `synthesize()` is a generator whose chunks are passed on as Modal delivers
them. Modal's synchronous client is driven from worker threads, one chunk per hop, so the event
loop never blocks and a client that goes away stops the remote generator at the next chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

from anyio import to_thread

from functions import modal_class_name
from functions.config import ModelConfig
from functions.protocol import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    SynthesisRequest,
)
from functions.serving import in_threads
from router.errors import (
    BackendUnavailable,
    ChorusError,
    InvalidRequest,
    SynthesisFailed,
)
from router.runners import PcmStream, Runner
from router.settings import Settings

#: (app name, class name) -> the class: `modal.Cls.from_name` in production; tests pass one that
#: routes calls through the classes' `.local()`.
Lookup = Callable[[str, str], Any]


def _from_name(app_name: str, class_name: str) -> Any:
    import modal

    return modal.Cls.from_name(app_name, class_name)


class ModalRunner(Runner):
    def __init__(self, app_name: str, lookup: Lookup | None = None):
        self.app_name = app_name
        self._lookup = lookup or _from_name
        self._instances: dict[tuple[str, str], Any] = {}
        self._described: dict[tuple[str, str], dict[str, Any]] = {}
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ModalRunner:
        return cls(settings.modal_app)

    async def start(self, preload: list[ModelConfig]) -> None:
        # Nothing is warmed on purpose: a backend costs money only once a request names it.
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready

    def _instance(self, config: ModelConfig) -> Any:
        key = (config.backend, config.name)
        if key not in self._instances:
            cls = self._lookup(self.app_name, modal_class_name(config.backend))
            # Lazy: nothing is sent to Modal until the first method call.
            self._instances[key] = cls(model=config.name)
        return self._instances[key]

    async def _call(self, config: ModelConfig, function: Callable[[], Any]) -> Any:
        try:
            return await to_thread.run_sync(function)
        except Exception as exc:
            raise self._translate(config.backend, exc) from exc

    async def _describe(self, config: ModelConfig) -> dict[str, Any]:
        key = (config.backend, config.name)
        if key not in self._described:
            instance = self._instance(config)
            self._described[key] = await self._call(config, lambda: instance.describe.remote())
        return self._described[key]

    async def voices(self, config: ModelConfig) -> list[str]:
        return list((await self._describe(config))["voices"])

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        sample_rate = int((await self._describe(config))["sample_rate"])
        instance = self._instance(config)
        payload = request.model_dump(mode="json")
        chunks = await self._call(config, lambda: iter(instance.synthesize.remote_gen(payload)))
        return PcmStream(sample_rate, self._chunks(config, chunks))

    async def _chunks(self, config: ModelConfig, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
        # Closing the remote generator early (in_threads does, when this stops) tells Modal to
        # stop synthesising.
        try:
            async with aclosing(in_threads(chunks)) as pcm:
                async for chunk in pcm:
                    if chunk:
                        yield chunk
        except Exception as exc:
            raise self._translate(config.backend, exc) from exc

    def _translate(self, backend: str, exc: Exception) -> ChorusError:
        """The router's error for what a Modal call raised: the backend's own errors come back
        as themselves; Modal's are about reaching the class."""
        if isinstance(exc, InvalidRequestError):
            return InvalidRequest(str(exc), param=exc.param)
        if isinstance(exc, BackendUnavailableError):
            return BackendUnavailable(f"backend '{backend}' is unavailable: {exc}")
        if isinstance(exc, BackendError):
            return SynthesisFailed(f"backend '{backend}' failed: {exc}")
        problem = _modal_problem(self.app_name, backend, exc)
        if problem is not None:
            return BackendUnavailable(f"backend '{backend}' is unavailable on Modal: {problem}")
        if isinstance(exc, OSError):
            return BackendUnavailable(f"backend '{backend}' is unavailable: Modal cannot be reached ({exc})")
        return SynthesisFailed(f"backend '{backend}' failed on Modal: {exc}")


def _modal_problem(app_name: str, backend: str, exc: Exception) -> str | None:
    """What a user can do about a Modal error that keeps the backend from being reached, or None
    for one that happened while it ran."""
    try:
        from modal import exception as errors
    except ImportError:
        return None
    if isinstance(exc, errors.AuthError):
        return (
            f"{exc} Set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET for the router (inside Modal they "
            f"are set for it), or run `modal token new`."
        )
    if isinstance(exc, errors.NotFoundError):
        return (
            f"app '{app_name}' has no class {modal_class_name(backend)} ({exc}); add a config "
            f"that uses backend '{backend}' and run `modal deploy infra/modal_app.py`"
        )
    if isinstance(exc, errors.FunctionTimeoutError):
        return None
    if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, errors.ResourceExhaustedError,
                        errors.ServiceError, errors.InternalError)):
        return str(exc) or exc.__class__.__name__
    return None
