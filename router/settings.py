"""Server settings, from the environment (HOST, PORT and CHORUS_*)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from functions.config import CONFIGLESS_MODELS, MEMORY_RELEASE_SECONDS

Mode = Literal["local", "http", "docker", "modal"]
#: The API families, each with its own input limit (the `family` SpeechService.prepare is given).
ApiFamily = Literal["openai", "localai", "elevenlabs", "sound-generation", "wyoming"]


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    configs_dir: Path = Path("configs")
    models_dir: Path = Path("models")
    #: How the router reaches backends: in this process, HTTP workers, worker containers it
    #: starts and stops itself, or Modal functions.
    mode: Mode = "local"
    #: OpenAI's documented limit on `input`; the other families share it.
    max_input_chars: int = Field(4096, ge=1)
    #: Upper bound on one synthesis chunk: keeps backend memory bounded on long text.
    chunk_chars: int = Field(250, ge=20)

    #: http mode: where each backend's worker listens, e.g. {"piper": "http://piper:9000"}.
    backend_urls: dict[str, str] = Field(default_factory=dict)
    #: http mode: seconds to connect to a worker, and to wait for its next bytes (a slow
    #: model's first chunk included).
    backend_connect_timeout: float = Field(5.0, gt=0)
    backend_read_timeout: float = Field(300.0, gt=0)
    #: http mode: seconds between probes of each worker's /healthz, which /readyz reports.
    backend_health_interval: float = Field(5.0, gt=0)
    #: docker mode: GPU workers that may run at once (each holds a GPU's memory).
    docker_gpu_slots: int = Field(1, ge=1)
    #: docker mode: run every worker without a GPU (same slot accounting), for hosts with none.
    docker_cpu_only: bool = False
    #: docker mode: the network the workers join (the router's, when it runs in a container).
    docker_network: str = Field("chorus-workers", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: docker mode: names and labels this router's workers, so two routers on a host never
    #: touch each other's.
    docker_project: str = Field("chorus", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    #: docker mode: worker images are <prefix><backend name>, as `make images` tags them.
    docker_image_prefix: str = Field("chorus/", pattern=r"^[a-z0-9][a-z0-9._/:-]*/$")
    #: docker mode: seconds a worker may take from its start until it is ready.
    docker_start_timeout: float = Field(600.0, gt=0)
    #: modal mode: the deployed Modal app whose classes serve the backends.
    modal_app: str = "chorus"
    #: modal mode: seconds a chunk's audio may take, a cold start included, before the client
    #: is told to retry (503, Retry-After). Modal's web endpoints give up on a response that
    #: has not begun within 150 s (they answer 303), so this stays below that.
    modal_start_wait: float = Field(120.0, gt=0, le=140)

    #: Models a LocalAI request may name without a config (a file in the models directory, or a
    #: backend's own model id), kept loaded at once per process or worker; 0 refuses them (404).
    configless_models: int = Field(CONFIGLESS_MODELS, ge=0)
    #: local mode: seconds with no synthesis running after which the memory past syntheses left
    #: behind (Piper's ONNX arenas, the C heap's free pages) is given back to the system.
    memory_release_seconds: float = Field(MEMORY_RELEASE_SECONDS, ge=0)

    #: API keys a client must present (Bearer, x-api-key or xi-api-key); none = an open server.
    api_keys: list[str] = Field(default_factory=list)
    #: Keys that also manage every user's saved voices (an operator's); they are valid keys too.
    admin_api_keys: list[str] = Field(default_factory=list)
    #: Largest request body accepted, in bytes (JSON text of max_input_chars fits many times).
    max_body_bytes: int = Field(1_048_576, ge=1024)
    #: Largest voice upload (its audio files and fields), in bytes: checked before any decoding.
    max_voice_upload_bytes: int = Field(20 * 1_048_576, ge=1024)
    #: Saved voices (the voice library, <models>/voices) this server keeps at most.
    max_voices: int = Field(100, ge=0)
    #: Per-route overrides of max_input_chars: keys openai, localai, elevenlabs, sound-generation,
    #: wyoming.
    max_input_chars_by_route: dict[ApiFamily, int] = Field(default_factory=dict)
    #: Requests that may wait for a busy model (past its deploy.max_concurrent_inputs) before
    #: more are refused with 429, and how long one may wait before a 503.
    max_queue: int = Field(16, ge=0)
    queue_timeout: float = Field(30.0, gt=0)
    #: On-disk cache of complete responses; no directory (the default) or a size of 0 = off.
    cache_dir: Path | None = None
    cache_max_mb: float = Field(512.0, ge=0)
    #: ElevenLabs' streaming WebSockets: sockets open at once on this server, and contexts
    #: (streams of text) open at once on one socket.
    websocket_max_sockets: int = Field(64, ge=1)
    websocket_max_contexts: int = Field(16, ge=1)
    #: The longest a socket stays open, in seconds: none by default; on Modal a little under the
    #: web function's time-out, which would otherwise cut it with no word (the Modal app sets it).
    websocket_max_seconds: float | None = Field(None, gt=0)
    #: Home Assistant's Wyoming protocol: the TCP port it is served on (on `host`), off when None;
    #: and the name it is advertised under by zeroconf (`_wyoming._tcp.local.`), not advertised
    #: when None.
    wyoming_port: int | None = Field(None, ge=0, le=65535)
    wyoming_zeroconf: str | None = Field(None, min_length=1, max_length=63)
    #: Wyoming connections open at once, and the seconds one may stay open with no event and no
    #: speech (Home Assistant opens one per request).
    wyoming_max_connections: int = Field(64, ge=1)
    wyoming_idle_timeout: float = Field(60.0, gt=0)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """The settings the environment gives, `overrides` (command-line flags) over them. A bad
        value is a SettingsError that names its variable."""
        values: dict[str, object] = {}
        for field, name in _ENV_NAMES.items():
            raw = os.environ.get(name)
            if raw in (None, ""):
                continue
            try:
                values[field] = _PARSERS[field](raw) if field in _PARSERS else raw
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0])
            raise SettingsError(
                f"{_ENV_NAMES.get(field, field)}: {error['msg']} (got {error['input']!r})"
            ) from None

    @property
    def every_api_key(self) -> list[str]:
        """The keys a request may present: users' and admins'."""
        return [*self.api_keys, *self.admin_api_keys]

    def input_limit(self, family: ApiFamily | None) -> int:
        if family is None:
            return self.max_input_chars
        return self.max_input_chars_by_route.get(family, self.max_input_chars)


class SettingsError(ValueError):
    """A setting the environment (or a flag) gives that Chorus cannot use."""


def _split(value: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _pairs(value: str) -> dict[str, str]:
    """`piper=http://piper:9000, coqui=http://coqui:9000` -> {"piper": ..., "coqui": ...}."""
    pairs = {}
    for item in _split(value):
        name, equals, setting = item.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"'{item}' is not name=value")
        pairs[name.strip()] = setting.strip()
    return pairs


#: Each setting's environment variable.
_ENV_NAMES = {
    "host": "HOST",
    "port": "PORT",
    "configs_dir": "CHORUS_CONFIGS_DIR",
    "models_dir": "CHORUS_MODELS_DIR",
    "mode": "CHORUS_MODE",
    "max_input_chars": "CHORUS_MAX_INPUT_CHARS",
    "chunk_chars": "CHORUS_CHUNK_CHARS",
    "backend_urls": "CHORUS_BACKEND_URLS",
    "backend_connect_timeout": "CHORUS_BACKEND_CONNECT_TIMEOUT",
    "backend_read_timeout": "CHORUS_BACKEND_READ_TIMEOUT",
    "backend_health_interval": "CHORUS_BACKEND_HEALTH_INTERVAL",
    "docker_gpu_slots": "CHORUS_DOCKER_GPU_SLOTS",
    "docker_cpu_only": "CHORUS_DOCKER_CPU_ONLY",
    "docker_network": "CHORUS_DOCKER_NETWORK",
    "docker_project": "CHORUS_DOCKER_PROJECT",
    "docker_image_prefix": "CHORUS_DOCKER_IMAGE_PREFIX",
    "docker_start_timeout": "CHORUS_DOCKER_START_TIMEOUT",
    "modal_app": "CHORUS_MODAL_APP",
    "modal_start_wait": "CHORUS_MODAL_START_WAIT",
    "configless_models": "CHORUS_CONFIGLESS_MODELS",
    "memory_release_seconds": "CHORUS_MEMORY_RELEASE_SECONDS",
    "api_keys": "CHORUS_API_KEYS",
    "admin_api_keys": "CHORUS_ADMIN_API_KEYS",
    "max_voice_upload_bytes": "CHORUS_MAX_VOICE_UPLOAD_BYTES",
    "max_voices": "CHORUS_MAX_VOICES",
    "max_body_bytes": "CHORUS_MAX_BODY_BYTES",
    "max_input_chars_by_route": "CHORUS_MAX_INPUT_CHARS_BY_ROUTE",
    "max_queue": "CHORUS_MAX_QUEUE",
    "queue_timeout": "CHORUS_QUEUE_TIMEOUT",
    "cache_dir": "CHORUS_CACHE_DIR",
    "cache_max_mb": "CHORUS_CACHE_MAX_MB",
    "websocket_max_sockets": "CHORUS_WEBSOCKET_MAX_SOCKETS",
    "websocket_max_contexts": "CHORUS_WEBSOCKET_MAX_CONTEXTS",
    "websocket_max_seconds": "CHORUS_WEBSOCKET_MAX_SECONDS",
    "wyoming_port": "CHORUS_WYOMING_PORT",
    "wyoming_zeroconf": "CHORUS_WYOMING_ZEROCONF",
    "wyoming_max_connections": "CHORUS_WYOMING_MAX_CONNECTIONS",
    "wyoming_idle_timeout": "CHORUS_WYOMING_IDLE_TIMEOUT",
}
#: Settings whose variable holds a list: `a, b` or `name=value, ...`.
_PARSERS = {
    "backend_urls": _pairs,
    "api_keys": _split,
    "admin_api_keys": _split,
    "max_input_chars_by_route": _pairs,
}
