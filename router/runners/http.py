"""Http mode: each backend runs in its own worker process (its container in docker compose),
reached over the worker protocol that functions/worker.py serves.

PCM is passed through as the worker streams it, with no retry once audio has started: a worker
that is slow is waited for (up to the read time-out between two reads), and a worker that dies
mid-stream makes the chunk iterator raise, so the router aborts its own response instead of
presenting a truncated file as complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, get_args

import httpx

from functions.config import BackendName, ConfigError, ModelConfig
from functions.protocol import FRAMED_MEDIA_TYPE, SAMPLE_FORMAT, STATUS, FrameReader, Spoken, SynthesisRequest
from functions.streams import released_by
from router.errors import BackendUnavailable, SynthesisFailed, backend_error
from router.runners import PcmStream, Runner
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
        self.read_timeout = read_timeout
        self.health_interval = health_interval
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout)
        self._probe_timeout = httpx.Timeout(min(read_timeout, 10.0), connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None
        #: backend -> why its worker cannot serve now; a backend absent from it is healthy.
        self._problems: dict[str, str] = {name: "not probed yet" for name in self.backend_urls}
        self._needed: set[str] = set()
        #: backends whose worker has answered healthy since start
        self._seen: set[str] = set()
        #: (backend, config JSON) -> its worker's voice list, asked once rather than on every
        #: voice listing: it changes only with what the worker loaded, so a probe or call that
        #: finds the worker down drops its backend's lists.
        self._voices: dict[tuple[str, str], list[str]] = {}
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

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: workers sit on the private network; a proxy set for the outside
            # world must not capture the calls to them.
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        return self._client

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
        await asyncio.gather(*(self._probe(name) for name in self.backend_urls))

    async def _probe(self, backend: str) -> None:
        base = self.backend_urls[backend]
        try:
            response = await self.client.get(f"{base}/healthz", timeout=self._probe_timeout)
        except httpx.HTTPError as exc:
            self._set_health(backend, f"its worker at {base} cannot be reached ({_describe(exc)})")
            return
        if response.status_code == 200:
            self._set_health(backend, None)
        else:
            self._set_health(backend, f"its worker is not ready ({_error_message(response)})")

    def _set_health(self, backend: str, problem: str | None) -> None:
        before = self._problems.get(backend)
        if problem is None:
            self._seen.add(backend)
            self._problems.pop(backend, None)
            if before is not None:
                log.info("backend '%s' is ready", backend)
        else:
            self._problems[backend] = problem
            self._forget_voices(backend)
            if before is None:
                log.warning("backend '%s' is unavailable: %s", backend, problem)

    def _forget_voices(self, backend: str) -> None:
        self._voices = {key: names for key, names in self._voices.items() if key[0] != backend}

    def _url(self, backend: str) -> str:
        try:
            return self.backend_urls[backend]
        except KeyError:
            raise BackendUnavailable(
                f"backend '{backend}' has no worker: add it to CHORUS_BACKEND_URLS "
                f"(e.g. {backend}=http://{backend}:9000)"
            ) from None

    async def _post(self, backend: str, path: str, payload: dict[str, Any]) -> httpx.Response:
        """The worker's response, status 200 and body not yet read; every other outcome is
        raised as the router's error."""
        base = self._url(backend)
        request = self.client.build_request("POST", f"{base}{path}", json=payload)
        for attempt in (1, 2):
            try:
                response = await self.client.send(request, stream=True)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                problem = f"its worker at {base} cannot be reached ({_describe(exc)})"
                self._set_health(backend, problem)
                raise BackendUnavailable(f"backend '{backend}' is unavailable: {problem}") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection broke before any answer, e.g. a kept-alive connection to a
                # worker that has restarted since: nothing was received, so one retry cannot
                # duplicate audio.
                if attempt == 2:
                    problem = f"its worker at {base} closed the connection ({_describe(exc)})"
                    self._set_health(backend, problem)
                    raise BackendUnavailable(f"backend '{backend}' is unavailable: {problem}") from exc
            except httpx.TimeoutException as exc:
                raise SynthesisFailed(
                    f"backend '{backend}' did not answer within {self.read_timeout:g} s"
                ) from exc
        if response.status_code == 200:
            self._set_health(backend, None)
            return response
        try:
            await response.aread()
        except httpx.HTTPError:
            pass  # no readable body: the status alone says what happened
        finally:
            await response.aclose()
        message = _error_message(response)
        code = _error_field(response, "code")
        if STATUS.get(code) != response.status_code:
            # Not the worker's own answer (a proxy's, or no body): its status says what it is.
            code = {400: "invalid_request", 503: "backend_unavailable"}.get(response.status_code, "synthesis_failed")
        raise backend_error(backend, code, message, _error_param(response))

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        response = await self._post(
            config.backend,
            "/synthesize",
            {"config": _config_json(config), "request": request.model_dump(mode="json")},
        )
        try:
            sample_rate = int(response.headers["x-sample-rate"])
            sample_format = response.headers.get("x-sample-format", SAMPLE_FORMAT)
            channels = int(response.headers.get("x-channels", "1"))
        except (KeyError, ValueError):
            await response.aclose()
            raise SynthesisFailed(
                f"backend '{config.backend}' answered without a valid X-Sample-Rate header"
            ) from None
        if sample_format != SAMPLE_FORMAT or channels != 1:
            await response.aclose()
            raise SynthesisFailed(
                f"backend '{config.backend}' sent {sample_format} with {channels} channels; "
                f"the router takes {SAMPLE_FORMAT} mono"
            )
        # Closing the stream before its end drops the connection, which tells the worker to stop.
        framed = response.headers.get("content-type", "").startswith(FRAMED_MEDIA_TYPE)
        pcm = (_worker_frames if framed else _worker_pcm)(config.backend, response, self.read_timeout)
        return PcmStream(sample_rate, released_by(pcm, response.aclose))

    async def voices(self, config: ModelConfig) -> list[str]:
        payload = {"config": _config_json(config)}
        key = (config.backend, json.dumps(payload, sort_keys=True))
        if key in self._voices:
            return list(self._voices[key])
        response = await self._post(config.backend, "/voices", payload)
        try:
            await response.aread()
            self._voices[key] = list(response.json()["voices"])
            return list(self._voices[key])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise SynthesisFailed(
                f"backend '{config.backend}' sent an unreadable voice list ({exc})"
            ) from exc
        finally:
            await response.aclose()

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _worker_pcm(backend: str, response: httpx.Response, read_timeout: float) -> AsyncIterator[bytes]:
    """A worker's PCM as it arrives, in whole samples."""
    # Network reads split the stream anywhere; a half sample is held back until its other byte
    # arrives, so that every chunk passed on is whole samples.
    odd = b""
    async for data in _reads(backend, response, read_timeout):
        if odd:
            data, odd = odd + data, b""
        if len(data) % 2:
            data, odd = data[:-1], data[-1:]
        if data:
            yield data
    if odd:
        raise SynthesisFailed(f"backend '{backend}' sent a truncated sample; the audio is incomplete")


async def _worker_frames(backend: str, response: httpx.Response, read_timeout: float) -> AsyncIterator[Spoken]:
    """A worker's PCM and word times, from its frames."""
    frames = FrameReader()
    async for data in _reads(backend, response, read_timeout):
        try:
            for item in frames.feed(data):
                yield item
        except ValueError as exc:
            raise SynthesisFailed(f"backend '{backend}' sent an unreadable frame ({exc})") from exc
    if frames.partial:
        raise SynthesisFailed(f"backend '{backend}' sent a truncated frame; the audio is incomplete")


async def _reads(backend: str, response: httpx.Response, read_timeout: float) -> AsyncIterator[bytes]:
    try:
        async for data in response.aiter_raw():
            yield data
    except httpx.TimeoutException as exc:
        raise SynthesisFailed(
            f"backend '{backend}' sent nothing for {read_timeout:g} s; the audio is incomplete"
        ) from exc
    except httpx.TransportError as exc:
        raise SynthesisFailed(
            f"backend '{backend}' stopped mid-stream ({_describe(exc)}); the audio is incomplete"
        ) from exc


def _config_json(config: ModelConfig) -> dict[str, Any]:
    # by_alias: `tts.vall-e` keeps its YAML spelling, so the worker validates the same document.
    return config.model_dump(mode="json", by_alias=True)


def _describe(exc: Exception) -> str:
    return str(exc) or exc.__class__.__name__


def _error_field(response: httpx.Response, field: str) -> Any:
    try:
        error = response.json()["error"]
        return error.get(field) if isinstance(error, dict) else None
    except (ValueError, KeyError, TypeError, httpx.StreamError):
        return None


def _error_message(response: httpx.Response) -> str:
    message = _error_field(response, "message")
    return message if isinstance(message, str) and message else f"HTTP {response.status_code}"


def _error_param(response: httpx.Response) -> str | None:
    param = _error_field(response, "param")
    return param if isinstance(param, str) else None
