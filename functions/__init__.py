"""Synthesis backends, one module each, imported only when a config names them."""

from __future__ import annotations

import importlib
from pathlib import Path

from functions.config import BACKENDS, ModelConfig
from functions.protocol import Backend, BackendUnavailableError

__all__ = ["BACKENDS", "PROMPT_BACKENDS", "backend_class", "clones_voices", "create_backend", "modal_class_name"]

#: Backends whose input is one prompt describing a sound, not prose: the router sends it whole
#: (never sentence by sentence) and serves them on the sound-generation route. Kept here, not on
#: the backend classes, so the router can read it without importing a backend's libraries.
PROMPT_BACKENDS: frozenset[str] = frozenset({"transformers-musicgen"})


def clones_voices(config: ModelConfig) -> bool:
    """Whether the model clones a voice from any reference recording a request names (a path in
    the models directory): the models a saved voice of the library (router/voices.py) may be
    spoken by. VALL-E X always does; of Coqui's models only XTTS, read from the config's model
    name since the router never loads one (VITS and the rest speak their own speakers only)."""
    if config.backend == "vall-e-x":
        return True
    return config.backend == "coqui" and "xtts" in (config.parameters.model or config.name).lower()


def modal_class_name(backend: str) -> str:
    """The Modal class serving `backend` is named after its backend class (PiperBackend, ...):
    infra/modal_app.py defines it and the router's Modal runner looks it up by this name."""
    return BACKENDS[backend]


def backend_class(name: str) -> type[Backend]:
    try:
        class_name = BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(f"backend '{name}' is not implemented") from None
    try:
        module = importlib.import_module("functions." + name.replace("-", "_"))
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(
            f"backend '{name}' is not installed in this environment ({exc.name or exc} is "
            f"missing); run it in its own image, images/{name}, or install "
            f"images/{name}/requirements.txt"
        ) from exc
    return getattr(module, class_name)


def create_backend(config: ModelConfig, models_dir: Path) -> Backend:
    return backend_class(config.backend)(config, models_dir)
