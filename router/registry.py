"""The model configs a router serves, and how a request's fields select and override them."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from functions.config import (
    BackendName,
    ModelConfig,
    UnsafePathError,
    check_paths,
    load_configs,
    resolve_in,
)
from router.errors import InvalidRequest, ModelNotFound

# Every OpenAI client must send one of these; a model that does not map a name to one of its own
# voices speaks it with its default voice rather than refusing the request.
OPENAI_VOICES = frozenset(
    ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"]
)


class ModelRegistry:
    def __init__(self, configs: list[ModelConfig], models_dir: Path):
        for config in configs:
            check_paths(config, models_dir)
        self._configs = {config.name: config for config in configs}
        self.models_dir = models_dir

    @classmethod
    def from_dir(cls, configs_dir: Path, models_dir: Path) -> ModelRegistry:
        return cls(load_configs(configs_dir, models_dir), models_dir)

    def all(self) -> list[ModelConfig]:
        return list(self._configs.values())

    def get(self, name: str | None, backend: str | None = None) -> ModelConfig:
        """The config for `name` (the first config when none is given), LocalAI-style: with a
        `backend`, a name that is no config is taken as a model file in the models directory."""
        if backend is not None and backend not in get_args(BackendName):
            raise InvalidRequest(
                f"unknown backend '{backend}'; known: {', '.join(get_args(BackendName))}",
                param="backend",
            )
        if not name:
            if not self._configs:
                raise ModelNotFound("no model is configured", param="model")
            config = next(iter(self._configs.values()))
        elif name in self._configs:
            config = self._configs[name]
        elif backend is not None:
            return self._file_model(name, backend)
        else:
            raise ModelNotFound(
                f"model '{name}' does not exist; available: {', '.join(self._configs)}",
                param="model",
            )
        if backend is not None and backend != config.backend:
            config = config.model_copy(update={"backend": backend})
        return config

    def _file_model(self, name: str, backend: str) -> ModelConfig:
        try:
            path = resolve_in(self.models_dir, name)
            config = ModelConfig(name=name, backend=backend, parameters={"model": name})
        except (UnsafePathError, ValidationError):
            raise InvalidRequest(
                f"model '{name}' is not a valid model name or file inside the models directory",
                param="model",
            ) from None
        if not path.is_file():
            raise ModelNotFound(f"model '{name}' does not exist", param="model")
        return config

    @staticmethod
    def voice_for(config: ModelConfig, voice: str | None) -> str | None:
        """The request's voice mapped through the config, or the config's own voice."""
        if voice is None:
            return config.tts.voice
        if voice in config.voices:
            return config.voices[voice]
        if voice in OPENAI_VOICES:
            return config.tts.voice
        return voice
