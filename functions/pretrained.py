"""What the transformers backends (Bark, Parler-TTS, MusicGen) share: a model and its processor
loaded with `from_pretrained` (a folder of the models directory, else a hub id) into host memory,
moved to the GPU where there is one by `to_device()`, and one generation at a time, of a batch of
chunks of text (functions/batching.py) or of one. Imported only by those backends: it imports torch."""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from functions.batching import Prepared
from functions.config import ModelConfig
from functions.devices import best_device
from functions.hub import load_error, pretrained_source
from functions.protocol import Backend, BackendError, InvalidRequestError, SynthesisRequest

T = TypeVar("T")


class PretrainedBackend(Backend):
    #: The model family as messages name it ("Bark", "MusicGen").
    label: str

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._model: Any = None
        self._device = "cpu"
        # Generation draws from torch's global generator: one at a time keeps a seed meaningful.
        self._lock = threading.Lock()

    def _load_pretrained(self, model_class: Any, processor_class: Any, name: str | None = None) -> tuple[Any, str]:
        """Load the model (kept, on the CPU, in eval mode) and return its processor (or
        tokenizer) and where both came from; `name` overrides parameters.model."""
        source, local_only = pretrained_source(self.config, self.models_dir, name)
        try:
            processor = processor_class.from_pretrained(source, local_files_only=local_only)
            model = model_class.from_pretrained(source, local_files_only=local_only)
        except OSError as exc:
            raise load_error(self.config, source, exc) from exc
        self._model = model.eval()
        return processor, source

    def to_device(self) -> None:
        self._device = best_device()
        self._model = self.model.to(self._device)

    @property
    def model(self) -> Any:
        if self._model is None:
            raise BackendError(f"the {self.label} model is not loaded")
        return self._model

    def _refuse_speed(self, request: SynthesisRequest, hint: str = "") -> None:
        if request.speed != 1.0:
            raise InvalidRequestError(
                f"model '{self.config.name}' ({self.label}) cannot change the speed{hint}", param="speed"
            )

    @abstractmethod
    def prepare(self, request: SynthesisRequest) -> Prepared:
        """`functions.batching.Batchable.prepare`."""

    @abstractmethod
    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        """`functions.batching.Batchable.generate_batch`."""

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        yield from self.generate_batch([self.prepare(request)])

    def _generate(self, batch: Sequence[Prepared], generate: Callable[[], T]) -> T:
        with self._lock, torch.inference_mode():
            # A seeded chunk is always generated alone (functions/batching.py).
            if len(batch) == 1 and batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            return generate()
