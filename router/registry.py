"""The model configs a router serves, and how a request's fields select and override them."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import get_args

from functions.config import (
    CONFIGLESS_MODELS,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    BackendName,
    ModelConfig,
    UnsafePathError,
    check_paths,
    configless_config,
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
    def __init__(self, configs: list[ModelConfig], models_dir: Path, configless: int = CONFIGLESS_MODELS):
        for config in configs:
            check_paths(config, models_dir)
        self._configs = {config.name: config for config in configs}
        self.models_dir = models_dir
        #: How many config-less models are listed at once (as many as a pool keeps); 0 refuses
        #: them.
        self.configless = configless
        #: Config-less models that have served a request, least recently used first.
        self._served: OrderedDict[tuple[str, str], ModelConfig] = OrderedDict()

    @classmethod
    def from_dir(cls, configs_dir: Path, models_dir: Path, configless: int = CONFIGLESS_MODELS) -> ModelRegistry:
        return cls(load_configs(configs_dir, models_dir), models_dir, configless)

    def all(self) -> list[ModelConfig]:
        """The configs, then the config-less models loaded now (they are listed nowhere else)."""
        return [*self._configs.values(), *self._served.values()]

    def get(self, name: str | None, backend: str | None = None, configless: bool = False) -> ModelConfig:
        """The config for `name` (the first config when none is given; the first of `backend`'s
        when one is). With `configless` (LocalAI's route), a name that is no config is still
        served, LocalAI's way: see `_configless`."""
        if backend is not None and backend not in get_args(BackendName):
            raise InvalidRequest(
                f"unknown backend '{backend}'; known: {', '.join(get_args(BackendName))}",
                param="backend",
            )
        if name in self._configs:
            config = self._configs[name]
        elif not name:
            config = self._default(backend, configless)
        elif configless and self.configless:
            return self._configless(name, backend or "piper")
        else:
            raise ModelNotFound(
                f"model '{name}' does not exist; available: {', '.join(self._configs)}",
                param="model",
            )
        if backend is not None and backend != config.backend:
            config = config.model_copy(update={"backend": backend})
        return config

    def _default(self, backend: str | None, configless: bool) -> ModelConfig:
        for config in self._configs.values():
            if backend is None or config.backend == backend:
                return config
        if backend is not None and configless and self.configless:
            # LocalAI's `{"backend": "vall-e-x", "input": ...}`: the backend's own default model.
            return self._configless(None, backend)
        raise ModelNotFound(
            f"no model of backend '{backend}' is configured" if backend else "no model is configured",
            param="model",
        )

    def _configless(self, name: str | None, backend: str) -> ModelConfig:
        """LocalAI's bare config: named after the model, which is a file in the models directory
        or else the backend's own model id; the backend's first config lends its deploy block
        (its GPU and limits), so the model runs where that backend's configured models do."""
        if name is not None:
            if len(name) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, name):
                raise InvalidRequest(
                    f"model '{name[:80]}' is not a valid model name or file inside the models "
                    f"directory: parts of letters, digits, '.', '_' and '-' joined by '/', none "
                    f"starting with '.', at most {NAME_MAX_LENGTH} characters",
                    param="model",
                )
            try:
                resolve_in(self.models_dir, name)
            except UnsafePathError as exc:
                raise InvalidRequest(f"model '{name}': {exc}", param="model") from None
        lender = next((c for c in self._configs.values() if c.backend == backend), None)
        return configless_config(name, backend, lender.deploy if lender is not None else None)

    def served(self, config: ModelConfig) -> None:
        """`config` (a config-less model) has served a request: list it, within the bound."""
        key = (config.name, config.backend)
        self._served[key] = config
        self._served.move_to_end(key)
        while len(self._served) > self.configless:
            self._served.popitem(last=False)

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
