"""Parler-TTS: speech in the voice a sentence describes ("A female speaker with a low-pitched
voice..."). The description comes from the request's `instructions` or `voice`, else the config's
`tts.voice`, else LocalAI's default."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from parler_tts import ParlerTTSForConditionalGeneration
from transformers import AutoTokenizer

from functions.config import ModelConfig
from functions.hub import load_error, pretrained_source
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    SynthesisRequest,
    pcm16,
)

#: LocalAI's description when a request gives none.
DEFAULT_DESCRIPTION = (
    "A female speaker with a slightly low-pitched voice delivers her words quite expressively, "
    "in a very confined sounding environment with clear audio quality. She speaks very fast."
)


class ParlerBackend(Backend):
    name = "parler-tts"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._model: ParlerTTSForConditionalGeneration | None = None
        self._tokenizer = None
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        # Generation draws from torch's global generator: one at a time keeps a seed meaningful.
        self._lock = threading.Lock()

    def load(self) -> None:
        source, local_only = pretrained_source(self.config, self.models_dir)
        try:
            model = ParlerTTSForConditionalGeneration.from_pretrained(
                source, local_files_only=local_only
            )
            self._tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except OSError as exc:
            raise load_error(self.config, source, exc) from exc
        self._model = model.to(self._device).eval()

    @property
    def model(self) -> ParlerTTSForConditionalGeneration:
        if self._model is None:
            raise BackendError("the Parler-TTS model is not loaded")
        return self._model

    @property
    def sample_rate(self) -> int:
        return self.model.config.sampling_rate

    def voices(self) -> list[str]:
        # Any description is a voice; there is no list to offer.
        return []

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        if request.speed != 1.0:
            raise InvalidRequestError(
                f"model '{self.config.name}' (Parler-TTS) cannot change the speed; describe the "
                "pace in the voice description instead (\"speaks slowly\")",
                param="speed",
            )
        description = request.instructions or request.voice or DEFAULT_DESCRIPTION
        described = self._tokenizer(description, return_tensors="pt").to(self._device)
        prompt = self._tokenizer(request.text, return_tensors="pt").to(self._device)
        with self._lock, torch.inference_mode():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            audio = self.model.generate(
                input_ids=described.input_ids,
                attention_mask=described.attention_mask,
                prompt_input_ids=prompt.input_ids,
                prompt_attention_mask=prompt.attention_mask,
            )
        yield pcm16(audio[0].float().cpu().numpy())
