"""Server settings, from the environment (HOST, PORT and CHORUS_*)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Mode = Literal["local", "http", "modal"]


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    configs_dir: Path = Path("configs")
    models_dir: Path = Path("models")
    #: How the router reaches backends: in this process, HTTP workers, or Modal functions.
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
    #: modal mode: the deployed Modal app whose classes serve the backends.
    modal_app: str = "chorus"

    #: API keys a client must present (Bearer, x-api-key or xi-api-key); none = an open server.
    api_keys: list[str] = Field(default_factory=list)
    #: Largest request body accepted, in bytes (JSON text of max_input_chars fits many times).
    max_body_bytes: int = Field(1_048_576, ge=1024)
    #: Per-route overrides of max_input_chars: keys openai, localai, elevenlabs, sound-generation.
    max_input_chars_by_route: dict[str, int] = Field(default_factory=dict)
    #: Requests that may wait for a busy model (past its deploy.max_concurrent_inputs) before
    #: more are refused with 429, and how long one may wait before a 503.
    max_queue: int = Field(16, ge=0)
    queue_timeout: float = Field(30.0, gt=0)
    #: On-disk cache of complete responses; no directory (the default) or a size of 0 = off.
    cache_dir: Path | None = None
    cache_max_mb: float = Field(512.0, ge=0)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = {
            "host": os.environ.get("HOST"),
            "port": os.environ.get("PORT"),
            "configs_dir": os.environ.get("CHORUS_CONFIGS_DIR"),
            "models_dir": os.environ.get("CHORUS_MODELS_DIR"),
            "mode": os.environ.get("CHORUS_MODE"),
            "max_input_chars": os.environ.get("CHORUS_MAX_INPUT_CHARS"),
            "chunk_chars": os.environ.get("CHORUS_CHUNK_CHARS"),
            "backend_urls": _parse_urls(os.environ.get("CHORUS_BACKEND_URLS")),
            "backend_connect_timeout": os.environ.get("CHORUS_BACKEND_CONNECT_TIMEOUT"),
            "backend_read_timeout": os.environ.get("CHORUS_BACKEND_READ_TIMEOUT"),
            "backend_health_interval": os.environ.get("CHORUS_BACKEND_HEALTH_INTERVAL"),
            "modal_app": os.environ.get("CHORUS_MODAL_APP"),
            "api_keys": _split(os.environ.get("CHORUS_API_KEYS")),
            "max_body_bytes": os.environ.get("CHORUS_MAX_BODY_BYTES"),
            "max_input_chars_by_route": _parse_urls(os.environ.get("CHORUS_MAX_INPUT_CHARS_BY_ROUTE")),
            "max_queue": os.environ.get("CHORUS_MAX_QUEUE"),
            "queue_timeout": os.environ.get("CHORUS_QUEUE_TIMEOUT"),
            "cache_dir": os.environ.get("CHORUS_CACHE_DIR"),
            "cache_max_mb": os.environ.get("CHORUS_CACHE_MAX_MB"),
        }
        values = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def input_limit(self, route: str | None) -> int:
        return self.max_input_chars_by_route.get(route or "", self.max_input_chars)


def _split(value: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]."""
    if not value:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_urls(value: str | None) -> dict[str, str] | None:
    """`piper=http://piper:9000,coqui=http://coqui:9000` -> {"piper": ..., "coqui": ...}
    (any `name=value` list: CHORUS_MAX_INPUT_CHARS_BY_ROUTE is read with it too)."""
    if not value:
        return None
    pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
    return {name.strip(): url.strip() for name, url in pairs}
