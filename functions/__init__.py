"""Synthesis backends, one module each, imported only when a config names them."""

from __future__ import annotations

import importlib
from pathlib import Path

from functions.config import ModelConfig
from functions.protocol import Backend, BackendUnavailableError

# backend name -> (module, class). The module is imported lazily: each backend's libraries exist
# only in its own image, images/<backend name>/.
BACKENDS: dict[str, tuple[str, str]] = {
    "piper": ("functions.piper", "PiperBackend"),
    "coqui": ("functions.coqui", "CoquiBackend"),
    "bark": ("functions.bark", "BarkBackend"),
    "parler-tts": ("functions.parler", "ParlerBackend"),
    "transformers-musicgen": ("functions.musicgen", "MusicgenBackend"),
    "vall-e-x": ("functions.valle", "ValleBackend"),
}

#: Backends whose input is one prompt describing a sound, not prose: the router sends it whole
#: (never sentence by sentence) and serves them on the sound-generation route. Kept here, not on
#: the backend classes, so the router can read it without importing a backend's libraries.
PROMPT_BACKENDS: frozenset[str] = frozenset({"transformers-musicgen"})


def modal_class_name(backend: str) -> str:
    """The Modal class serving `backend` is named after its backend class (PiperBackend, ...):
    infra/modal_app.py defines it and the router's Modal runner looks it up by this name."""
    return BACKENDS[backend][1]


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, class_name = BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(f"backend '{name}' is not implemented") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(
            f"backend '{name}' is not installed in this environment ({exc.name or exc} is "
            f"missing); run it in its own image, images/{name}, or install "
            f"images/{name}/requirements.txt"
        ) from exc
    return getattr(module, class_name)


def create_backend(config: ModelConfig, models_dir: Path) -> Backend:
    return backend_class(config.backend)(config, models_dir)
