"""MusicGen through transformers: a text prompt describing music or a sound becomes audio
(32 kHz mono for the public checkpoints). The prompt is the whole input, never split."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoProcessor, MusicgenForConditionalGeneration

from functions.config import ModelConfig
from functions.hub import load_error, pretrained_source
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    SynthesisRequest,
    pcm16,
)

#: LocalAI's length on the speech routes, which carry no duration: 512 tokens, about 10 s.
SPEECH_ROUTE_TOKENS = 512


class MusicgenBackend(Backend):
    name = "transformers-musicgen"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._model: MusicgenForConditionalGeneration | None = None
        self._processor = None
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        # Generation draws from torch's global generator: one at a time keeps a seed meaningful.
        self._lock = threading.Lock()

    def load(self) -> None:
        source, local_only = pretrained_source(self.config, self.models_dir)
        try:
            self._processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
            model = MusicgenForConditionalGeneration.from_pretrained(
                source, local_files_only=local_only
            )
        except OSError as exc:
            raise load_error(self.config, source, exc) from exc
        self._model = model.to(self._device).eval()

    @property
    def model(self) -> MusicgenForConditionalGeneration:
        if self._model is None:
            raise BackendError("the MusicGen model is not loaded")
        return self._model

    @property
    def sample_rate(self) -> int:
        return self.model.config.audio_encoder.sampling_rate

    def voices(self) -> list[str]:
        # The prompt alone says what is heard: MusicGen has no voices.
        return []

    def _max_new_tokens(self, duration: float | None) -> int:
        if duration is None:
            return SPEECH_ROUTE_TOKENS
        # One token per audio-codec frame. The codebook delay pattern eats the first
        # (codebooks - 1) steps, so they are added back to get the asked length.
        frames = round(duration * self.model.config.audio_encoder.frame_rate)
        return max(1, frames) + self.model.decoder.config.num_codebooks - 1

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        if request.speed != 1.0:
            raise InvalidRequestError(
                f"model '{self.config.name}' (MusicGen) cannot change the speed", param="speed"
            )
        inputs = self._processor(text=[request.text], padding=True, return_tensors="pt")
        options: dict = {"max_new_tokens": self._max_new_tokens(request.duration_seconds)}
        if request.guidance_scale is not None:
            options["guidance_scale"] = request.guidance_scale
        if request.do_sample is not None:
            options["do_sample"] = request.do_sample
        with self._lock, torch.inference_mode():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            audio = self.model.generate(**inputs.to(self._device), **options)
        yield pcm16(audio[0, 0].float().cpu().numpy())
