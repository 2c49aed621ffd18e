"""The model configs a deployment serves, and how a request's model and backend select one.

The router looks a request's model up here, and so does a Modal container for the model it is
started for, so both serve the same config (LocalAI's config-less models included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from functions.config import (
    BACKENDS,
    CONFIGLESS_MODELS,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    ModelConfig,
    UnsafePathError,
    check_paths,
    configless_config,
    resolve_in,
)
from functions.protocol import InvalidRequestError, ModelNotFoundError

#: The model LocalAI's own examples name (`{"model": "tts", "input": ...}`): the default model,
#: unless a config or a file of the models directory has that name.
LOCALAI_EXAMPLE_MODEL = "tts"


class ModelCatalog:
    def __init__(self, configs: Iterable[ModelConfig], models_dir: Path, configless: int = CONFIGLESS_MODELS):
        self._configs = {config.name: config for config in configs}
        #: alias -> the config it names (the first, where two configs claim one)
        self._aliases: dict[str, ModelConfig] = {}
        for config in self._configs.values():
            for alias in config.aliases:
                self._aliases.setdefault(alias, config)
        for config in self._configs.values():
            check_paths(config, models_dir)
        self.models_dir = models_dir
        #: How many config-less models may be served at once; 0 refuses them.
        self.configless = configless

    def configs(self) -> list[ModelConfig]:
        return list(self._configs.values())

    def get(self, name: str | None, backend: str | None = None, configless: bool = False) -> ModelConfig:
        """The config `name` names or is an alias of (the first config when none is given; the first of `backend`'s
        when one is), its backend replaced by `backend` where they differ. With `configless`
        (LocalAI's route), a name that is no config is still served, LocalAI's way: see
        `_configless`. Raises InvalidRequestError or ModelNotFoundError."""
        if backend is not None and backend not in BACKENDS:
            raise InvalidRequestError(f"unknown backend '{backend}'; known: {', '.join(BACKENDS)}", param="backend")
        if name in self._configs:
            config = self._configs[name]
        elif name in self._aliases:
            config = self._aliases[name]
        elif not name or (name == LOCALAI_EXAMPLE_MODEL and not (self.models_dir / name).exists()):
            config = self._default(backend, configless)
        elif configless and self.configless:
            return self._configless(name, backend or "piper")
        else:
            raise ModelNotFoundError(f"model '{name}' does not exist; available: {', '.join(self._configs)}")
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
        raise ModelNotFoundError(f"no model of backend '{backend}' is configured" if backend else "no model is configured")

    def _configless(self, name: str | None, backend: str) -> ModelConfig:
        """LocalAI's bare config: named after the model, which is a file in the models directory
        or else the backend's own model id; the backend's first config lends its deploy block
        (its GPU and limits), so the model runs where that backend's configured models do. The
        backend's default model is named after the backend."""
        if name == backend:
            name = None
        if name is not None:
            if len(name) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, name):
                raise InvalidRequestError(
                    f"model '{name[:80]}' is not a valid model name or file inside the models "
                    f"directory: parts of letters, digits, '.', '_' and '-' joined by '/', none "
                    f"starting with '.', at most {NAME_MAX_LENGTH} characters",
                    param="model",
                )
            try:
                resolve_in(self.models_dir, name)
            except UnsafePathError as exc:
                raise InvalidRequestError(f"model '{name}': {exc}", param="model") from None
        lender = next((c for c in self._configs.values() if c.backend == backend), None)
        return configless_config(name, backend, lender.deploy if lender is not None else None)
