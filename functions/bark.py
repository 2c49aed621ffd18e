"""Bark through transformers' `BarkModel` (suno's own package cannot load its checkpoints on a
current torch): 24 kHz speech in the voice of a preset such as `v2/en_speaker_6`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import BarkModel, BarkProcessor

from functions.batching import Prepared
from functions.config import ModelConfig, resolve_in
from functions.pretrained import PretrainedBackend
from functions.protocol import BackendError, InvalidRequestError, SynthesisRequest, pcm16

# LocalAI configs may name a voice preset as the model (`model: v2/en_speaker_4`); those are
# suno's preset names, and the weights are then Bark's own.
_PRESET_NAME = re.compile(r"^(v2/)?[a-z]{2}_speaker_\d$|^announcer$")
DEFAULT_CHECKPOINT = "suno/bark"


class BarkBackend(PretrainedBackend):
    name = "bark"
    label = "Bark"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._processor: BarkProcessor | None = None
        #: The preset a config names as its model, LocalAI's way.
        self._model_preset: str | None = None
        #: Voice presets as the model takes them, already on the device: the processor would
        #: read a preset's three .npy files again for every chunk of text.
        self._histories: dict[str, Any] = {}

    def _checkpoint(self) -> str | None:
        model = self.config.parameters.model
        if model and _PRESET_NAME.match(model) and not resolve_in(self.models_dir, model).is_dir():
            self._model_preset = model
            return DEFAULT_CHECKPOINT
        return model

    def load(self) -> None:
        self._processor, source = self._load_pretrained(BarkModel, BarkProcessor, self._checkpoint())
        if self._model_preset and self._model_preset not in self.voices():
            raise BackendError(
                f"model '{self.config.name}': voice preset '{self._model_preset}' is not in "
                f"{source}; available: {', '.join(self.voices()) or 'none'}"
            )

    @property
    def sample_rate(self) -> int:
        # The rate of the codec that turns Bark's tokens into a waveform (24 kHz for suno's).
        return self.model.codec_model.config.sampling_rate

    def voices(self) -> list[str]:
        if self._processor is None:
            raise BackendError("the Bark model is not loaded")
        return sorted(self._processor.available_voice_presets)

    def _preset(self, voice: str | None) -> str | None:
        voice = voice or self._model_preset
        if voice is None:
            return None  # Bark then picks a voice of its own for each chunk.
        # Checked here because the processor takes any other string as a path to a .npz file.
        if voice not in self.voices():
            raise InvalidRequestError(
                f"voice '{voice}' is not a voice preset of model '{self.config.name}'; "
                f"available: {', '.join(self.voices()) or 'none'}",
                param="voice",
            )
        return voice

    def _history(self, voice: str | None) -> Any:
        preset = self._preset(voice)
        if preset is None:
            return None
        if preset not in self._histories:
            # The processor loads a preset only along with some text; the text is dropped.
            loaded = self._processor(" ", voice_preset=preset)["history_prompt"]
            self._histories[preset] = loaded.to(self._device)
        return self._histories[preset]

    def prepare(self, request: SynthesisRequest) -> Prepared:
        self._refuse_speed(request)
        # The voice preset is the batch's (the model takes one history for all): it is the key.
        return Prepared(request.text, self._preset(request.voice), request.seed)

    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        history = self._history(batch[0].key)
        inputs = self._processor([item.inputs for item in batch]).to(self._device)
        audio, lengths = self._generate(batch, lambda: self.model.generate(
            **inputs, history_prompt=history, return_output_lengths=True))
        return [pcm16(clip[:length].float().cpu().numpy()) for clip, length in zip(audio, lengths, strict=True)]
