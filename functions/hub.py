"""Where the transformers-based backends load a checkpoint from: a folder of the models directory,
else a Hugging Face hub id (the way LocalAI configs name them). Imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

from functions.config import ModelConfig, resolve_in
from functions.protocol import BackendError, ModelNotFoundError

_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def pretrained_source(config: ModelConfig, models_dir: Path, name: str | None = None) -> tuple[str, bool]:
    """What `from_pretrained` should load `name` (by default `parameters.model`) from, and its
    `local_files_only`: a folder of the models directory is always local; a hub id stays off the
    network when HF_HUB_OFFLINE=1, so a missing checkpoint fails at once instead of hanging."""
    name = name or config.parameters.model
    if not name:
        raise BackendError(f"model '{config.name}': parameters.model names no checkpoint")
    folder = resolve_in(models_dir, name)
    if folder.is_dir():
        return str(folder), True
    return name, offline()


def load_error(config: ModelConfig, source: str, exc: Exception) -> BackendError:
    """`from_pretrained`'s OSError: a folder that holds no loadable checkpoint, or an id that is
    neither a folder nor in the Hugging Face cache."""
    if Path(source).is_absolute():
        return BackendError(
            f"model '{config.name}': cannot load the checkpoint in its folder "
            f"'{Path(source).name}' of the models directory: {exc}"
        )
    hint = (
        " (HF_HUB_OFFLINE=1 forbids downloading it: put the checkpoint in the models directory "
        "under that name)"
        if offline()
        else ""
    )
    return ModelNotFoundError(
        f"model '{config.name}': '{source}' is not a folder of the models directory and cannot be "
        f"loaded from the Hugging Face hub{hint}: {exc}"
    )
