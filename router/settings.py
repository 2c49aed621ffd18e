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
    #: modal mode: the deployed Modal app whose classes serve the backends.
    modal_app: str = "chorus"

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
            "modal_app": os.environ.get("CHORUS_MODAL_APP"),
        }
        values = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def _parse_urls(value: str | None) -> dict[str, str] | None:
    """`piper=http://piper:9000,coqui=http://coqui:9000` -> {"piper": ..., "coqui": ...}."""
    if not value:
        return None
    pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
    return {name.strip(): url.strip() for name, url in pairs}
