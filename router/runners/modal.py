"""Modal mode: each backend is a class of the deployed Modal app (infra/modal_app.py), looked up
by name, given the model's own `deploy:` settings (`with_options`, `with_concurrency`) and
instantiated with the model's name, so Modal starts a model's containers, on its GPU, only when a
request names it.

Each chunk of text is one call of the class's async `synthesize`, spawned, so that a client who
leaves cancels the calls it has in flight: closing a `remote_gen` iterator sends Modal nothing
(modal 1.6.4), and cancelling a synchronous method with input concurrency stops its container.
Only Modal's async interface is used, so no call holds a thread.

Modal's web endpoints answer 303 to a request whose response has not begun within 150 s, and a
cold GPU container can take longer. A chunk's audio is awaited for `modal_start_wait` seconds:
past that the client gets 503 with Retry-After, while the call goes on and the container starts.

Voices are learnt from the calls that ran and remembered in a Modal Dict that every router
container reads, so a voice listing never starts a container.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from functions import modal_class_name
from functions.config import ModelConfig
from functions.protocol import Spoken, SynthesisRequest, WordTimes
from functions.serving import ServingError
from router.errors import (
    BackendTimeout,
    BackendUnavailable,
    ChorusError,
    ModelStarting,
    SynthesisFailed,
    backend_error,
)
from router.runners import PcmStream, Runner
from router.settings import Settings

if TYPE_CHECKING:
    from router.voices import SharedVolume

log = logging.getLogger("chorus")

#: (app name, class name) -> the class: `modal.Cls.from_name` in production.
Lookup = Callable[[str, str], Any]
#: The deployed app's Dict of voices by model name (`modal.Dict`'s interface).
VOICES_DICT = "chorus-voices"
#: The deployed app's Volume, mounted at the models directory of the router and every backend.
MODELS_VOLUME = "chorus-models"
#: The longest Retry-After for a model that is starting.
RETRY_AFTER = 30


def _from_name(app_name: str, class_name: str) -> Any:
    import modal

    return modal.Cls.from_name(app_name, class_name)


def _voices_dict() -> Any:
    import modal

    return modal.Dict.from_name(VOICES_DICT, create_if_missing=True)


def _models_volume() -> Any:
    """The Volume the router's models directory is, where the router runs in a Modal container
    (its web function mounts it); None elsewhere, where no commit could reach it."""
    import modal

    return None if modal.is_local() else modal.Volume.from_name(MODELS_VOLUME)


def model_instance(cls: Any, config: ModelConfig) -> Any:
    """The model's own variant of its backend's class: its GPU, windows, time-out, container
    ceiling and concurrency, scaled apart from every other model."""
    deploy = config.deploy
    variant = cls.with_options(**deploy.modal_options()).with_concurrency(max_inputs=deploy.max_concurrent_inputs)
    return variant(model=config.name)


class ModalRunner(Runner):
    def __init__(
        self,
        app_name: str,
        lookup: Lookup | None = None,
        voices_dict: Any = None,
        start_wait: float = 120.0,
        volume: Any = None,
    ):
        self.app_name = app_name
        self._lookup = lookup or _from_name
        self._voices_dict = voices_dict
        self.start_wait = start_wait
        self._volume = volume
        self._instances: dict[tuple[str, str], Any] = {}
        #: Voices by model, as the model's containers reported them.
        self._voices: dict[str, list[str]] = {}
        #: Calls left running after their client was told to retry, kept until they end.
        self._left_running: set[asyncio.Task[None]] = set()
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ModalRunner:
        return cls(settings.modal_app, start_wait=settings.modal_start_wait)

    async def start(self, preload: list[ModelConfig]) -> None:
        # Nothing is warmed on purpose: a backend costs money only once a request names it.
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready

    def capacity(self, config: ModelConfig) -> int:
        return config.deploy.capacity

    def models_volume(self) -> SharedVolume | None:
        # Backend containers already warm see a saved voice only once the router committed it.
        if self._volume is None:
            self._volume = _models_volume()
        return self._volume

    def _instance(self, config: ModelConfig) -> Any:
        key = (config.backend, config.name)
        if key not in self._instances:
            cls = self._lookup(self.app_name, modal_class_name(config.backend))
            # Lazy: nothing is sent to Modal until the first call.
            self._instances[key] = model_instance(cls, config)
        return self._instances[key]

    def _dict(self) -> Any:
        if self._voices_dict is None:
            self._voices_dict = _voices_dict()
        return self._voices_dict

    async def voices(self, config: ModelConfig) -> list[str] | None:
        """What the model's containers reported, from this process or the shared Dict; None
        for a model none of whose containers has run: only starting one could tell."""
        if config.name not in self._voices:
            try:
                remembered = await self._dict().get.aio(config.name)
            except Exception as exc:
                log.warning("cannot read the remembered voices of model '%s': %s", config.name, exc)
                return None
            if remembered is None:
                return None
            self._voices[config.name] = list(remembered)
        return list(self._voices[config.name])

    async def _remember(self, config: ModelConfig, voices: list[str]) -> None:
        if self._voices.get(config.name) == voices:
            return
        self._voices[config.name] = voices
        try:
            await self._dict().put.aio(config.name, voices)
        except Exception as exc:
            log.warning("cannot remember the voices of model '%s': %s", config.name, exc)

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        instance = self._instance(config)
        try:
            call = await instance.synthesize.spawn.aio(request.model_dump(mode="json"))
        except Exception as exc:
            raise self._translate(config.backend, exc) from exc
        result = asyncio.ensure_future(self._result(config, call))
        try:
            done = await asyncio.wait_for(asyncio.shield(result), self.start_wait)
        except TimeoutError:
            # The call goes on, so the container it started stays up for the retry.
            self._left_running.add(result)
            result.add_done_callback(self._forget_left_running)
            raise ModelStarting(
                f"model '{config.name}' is starting on Modal: its audio took over "
                f"{self.start_wait:g} s (a cold start); retry shortly",
                retry_after=min(RETRY_AFTER, math.ceil(self.start_wait)),
            ) from None
        except BaseException:
            if not result.done():
                # The client left: the call stops on Modal too.
                result.cancel()
                await asyncio.shield(_cancel(call))
            raise
        return PcmStream(int(done["sample_rate"]), _one(done["pcm"], done.get("word_times") or ()))

    async def _result(self, config: ModelConfig, call: Any) -> dict[str, Any]:
        try:
            done = await call.get.aio()
        except Exception as exc:
            raise self._translate(config.backend, exc) from exc
        await self._remember(config, list(done["voices"]))
        return done

    def _forget_left_running(self, result: asyncio.Task[Any]) -> None:
        self._left_running.discard(result)
        if not result.cancelled() and result.exception() is not None:
            log.warning("a call left running for a retry failed: %s", result.exception())

    async def close(self) -> None:
        for result in list(self._left_running):
            result.cancel()

    def _translate(self, backend: str, exc: Exception) -> ChorusError:
        """The router's error for what a Modal call raised: the backend's own errors come back
        as themselves; Modal's are about reaching the class."""
        if isinstance(exc, ChorusError):
            return exc
        if isinstance(exc, ServingError):
            return backend_error(backend, exc.code, exc.message, exc.param)
        if isinstance(exc, _modal_timeout()):
            # A call past its model's `deploy.timeout`, or a container that did not start within
            # its class's `deploy.startup_timeout`: Modal says which.
            return BackendTimeout(f"backend '{backend}' timed out on Modal: {exc}")
        problem = _modal_problem(self.app_name, backend, exc)
        if problem is not None:
            return BackendUnavailable(f"backend '{backend}' is unavailable on Modal: {problem}")
        if isinstance(exc, OSError):
            return BackendUnavailable(f"backend '{backend}' is unavailable: Modal cannot be reached ({exc})")
        return SynthesisFailed(f"backend '{backend}' failed on Modal: {exc}")


async def _one(pcm: bytes, word_times: Sequence[Sequence[int]]) -> AsyncIterator[Spoken]:
    if word_times:
        yield WordTimes(tuple(tuple(word) for word in word_times))
    if pcm:
        yield pcm


async def _cancel(call: Any) -> None:
    try:
        await call.cancel.aio()
    except Exception as exc:
        log.warning("cannot cancel a Modal call: %s", exc)


def _modal_timeout() -> tuple[type[BaseException], ...]:
    try:
        from modal.exception import FunctionTimeoutError
    except ImportError:
        return ()
    return (FunctionTimeoutError,)


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
    if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, errors.ResourceExhaustedError,
                        errors.ServiceError, errors.InternalError)):
        return str(exc) or exc.__class__.__name__
    return None
