"""The worker protocol (functions/worker.py) over HTTP, seen from the router: a synthesis, a
voice list, a health probe, each sent to one worker's base URL.

PCM is passed through as the worker streams it, with no retry once audio has started: a worker
that is slow is waited for (up to the read time-out between two reads), and a worker that dies
mid-stream makes the audio iterator raise, so the router aborts its own response instead of
presenting a truncated file as complete.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from functions.config import ModelConfig
from functions.protocol import FRAMED_MEDIA_TYPE, SAMPLE_FORMAT, STATUS, FrameReader, Spoken, SynthesisRequest
from functions.streams import released_by
from router.errors import BackendUnavailable, SynthesisFailed, backend_error
from router.runners import PcmStream

#: Told what each call learnt of a backend's worker: None when it answered, else why it cannot.
HealthReport = Callable[[str, "str | None"], None]


@dataclass(frozen=True)
class WorkerHealth:
    #: Why the worker cannot serve now; None when it is ready.
    problem: str | None
    #: The worker said it never will be (it cannot load its models), not only "not yet".
    failed: bool = False


class WorkerClient:
    def __init__(self, on_health: HealthReport, *, connect_timeout: float = 5.0, read_timeout: float = 300.0):
        self.on_health = on_health
        self.read_timeout = read_timeout
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout)
        self._probe_timeout = httpx.Timeout(min(read_timeout, 10.0), connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None
        #: (backend, config JSON) -> its worker's voice list, asked once rather than on every
        #: voice listing: it changes only with what the worker loaded, so a probe or call that
        #: finds the worker down drops its backend's lists.
        self._voices: dict[tuple[str, str], list[str]] = {}

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: workers sit on the private network; a proxy set for the outside
            # world must not capture the calls to them.
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        return self._client

    async def health(self, backend: str, base: str) -> WorkerHealth:
        try:
            response = await self.client.get(f"{base}/healthz", timeout=self._probe_timeout)
        except httpx.HTTPError as exc:
            return self._report(backend, WorkerHealth(f"its worker at {base} cannot be reached ({_describe(exc)})"))
        if response.status_code == 200:
            return self._report(backend, WorkerHealth(None))
        body = _json(response)
        if isinstance(body, dict) and body.get("status") == "failed" and isinstance(body.get("problem"), str):
            problem = f"its worker cannot load its models: {body['problem']}"
            return self._report(backend, WorkerHealth(problem, failed=True))
        return self._report(backend, WorkerHealth(f"its worker is not ready ({_error_message(response)})"))

    def _report(self, backend: str, health: WorkerHealth) -> WorkerHealth:
        if health.problem is not None:
            self.forget(backend)
        self.on_health(backend, health.problem)
        return health

    def forget(self, backend: str) -> None:
        """Drop what is known of `backend`'s worker: it is down, or another one replaces it."""
        self._voices = {key: names for key, names in self._voices.items() if key[0] != backend}

    async def stream(self, backend: str, base: str, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        payload = {"config": _config_json(config), "request": request.model_dump(mode="json")}
        response = await self._post(backend, base, "/synthesize", payload)
        try:
            sample_rate = int(response.headers["x-sample-rate"])
            sample_format = response.headers.get("x-sample-format", SAMPLE_FORMAT)
            channels = int(response.headers.get("x-channels", "1"))
        except (KeyError, ValueError):
            await response.aclose()
            raise SynthesisFailed(f"backend '{backend}' answered without a valid X-Sample-Rate header") from None
        if sample_format != SAMPLE_FORMAT or channels != 1:
            await response.aclose()
            raise SynthesisFailed(
                f"backend '{backend}' sent {sample_format} with {channels} channels; "
                f"the router takes {SAMPLE_FORMAT} mono"
            )
        # Closing the stream before its end drops the connection, which tells the worker to stop.
        framed = response.headers.get("content-type", "").startswith(FRAMED_MEDIA_TYPE)
        reads = self._reads(backend, base, response)
        audio = (_worker_frames if framed else _worker_pcm)(backend, reads)
        return PcmStream(sample_rate, released_by(audio, response.aclose))

    async def voices(self, backend: str, base: str, config: ModelConfig) -> list[str]:
        payload = {"config": _config_json(config)}
        key = (backend, json.dumps(payload, sort_keys=True))
        if key not in self._voices:
            response = await self._post(backend, base, "/voices", payload)
            try:
                await response.aread()
                self._voices[key] = list(response.json()["voices"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise SynthesisFailed(f"backend '{backend}' sent an unreadable voice list ({exc})") from exc
            finally:
                await response.aclose()
        return list(self._voices[key])

    async def _post(self, backend: str, base: str, path: str, payload: dict[str, Any]) -> httpx.Response:
        """The worker's response, status 200 and body not yet read; every other outcome is
        raised as the router's error."""
        request = self.client.build_request("POST", f"{base}{path}", json=payload)
        for attempt in (1, 2):
            try:
                response = await self.client.send(request, stream=True)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise self._unavailable(backend, f"its worker at {base} cannot be reached ({_describe(exc)})") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection broke before any answer, e.g. a kept-alive connection to a
                # worker that has restarted since: nothing was received, so one retry cannot
                # duplicate audio.
                if attempt == 2:
                    problem = f"its worker at {base} closed the connection ({_describe(exc)})"
                    raise self._unavailable(backend, problem) from exc
            except httpx.TimeoutException as exc:
                raise SynthesisFailed(f"backend '{backend}' did not answer within {self.read_timeout:g} s") from exc
        if response.status_code == 200:
            self.on_health(backend, None)
            return response
        try:
            await response.aread()
        except httpx.HTTPError:
            pass  # no readable body: the status alone says what happened
        finally:
            await response.aclose()
        code = _error_field(response, "code")
        if STATUS.get(code) != response.status_code:
            # Not the worker's own answer (a proxy's, or no body): its status says what it is.
            code = {400: "invalid_request", 503: "backend_unavailable"}.get(response.status_code, "synthesis_failed")
        raise backend_error(backend, code, _error_message(response), _error_param(response))

    async def _reads(self, backend: str, base: str, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for data in response.aiter_raw():
                yield data
        except httpx.TimeoutException as exc:
            raise SynthesisFailed(
                f"backend '{backend}' sent nothing for {self.read_timeout:g} s; the audio is incomplete"
            ) from exc
        except httpx.TransportError as exc:
            # The worker died mid-stream: /readyz says so until a probe finds it back, rather
            # than what the last probe saw.
            self._report(backend, WorkerHealth(f"its worker at {base} stopped mid-stream ({_describe(exc)})"))
            raise SynthesisFailed(
                f"backend '{backend}' stopped mid-stream ({_describe(exc)}); the audio is incomplete"
            ) from exc

    def _unavailable(self, backend: str, problem: str) -> BackendUnavailable:
        self._report(backend, WorkerHealth(problem))
        return BackendUnavailable(f"backend '{backend}' is unavailable: {problem}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _worker_pcm(backend: str, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A worker's PCM as it arrives, in whole samples."""
    # Network reads split the stream anywhere; a half sample is held back until its other byte
    # arrives, so that every chunk passed on is whole samples.
    odd = b""
    async for data in reads:
        if odd:
            data, odd = odd + data, b""
        if len(data) % 2:
            data, odd = data[:-1], data[-1:]
        if data:
            yield data
    if odd:
        raise SynthesisFailed(f"backend '{backend}' sent a truncated sample; the audio is incomplete")


async def _worker_frames(backend: str, reads: AsyncIterator[bytes]) -> AsyncIterator[Spoken]:
    """A worker's PCM and word times, from its frames."""
    frames = FrameReader()
    async for data in reads:
        try:
            for item in frames.feed(data):
                yield item
        except ValueError as exc:
            raise SynthesisFailed(f"backend '{backend}' sent an unreadable frame ({exc})") from exc
    if frames.partial:
        raise SynthesisFailed(f"backend '{backend}' sent a truncated frame; the audio is incomplete")


def _config_json(config: ModelConfig) -> dict[str, Any]:
    # by_alias: `tts.vall-e` keeps its YAML spelling, so the worker validates the same document.
    return config.model_dump(mode="json", by_alias=True)


def _describe(exc: Exception) -> str:
    return str(exc) or exc.__class__.__name__


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, httpx.StreamError):
        return None


def _error_field(response: httpx.Response, field: str) -> Any:
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    return error.get(field) if isinstance(error, dict) else None


def _error_message(response: httpx.Response) -> str:
    message = _error_field(response, "message")
    return message if isinstance(message, str) and message else f"HTTP {response.status_code}"


def _error_param(response: httpx.Response) -> str | None:
    param = _error_field(response, "param")
    return param if isinstance(param, str) else None
