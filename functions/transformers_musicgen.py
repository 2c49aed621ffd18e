"""MusicGen through transformers: a text prompt describing music or a sound becomes audio
(32 kHz mono for the public checkpoints). The prompt is the whole input, never split."""

from __future__ import annotations

from collections.abc import Iterator

from transformers import AutoProcessor, MusicgenForConditionalGeneration

from functions.pretrained import PretrainedBackend
from functions.protocol import SynthesisRequest, pcm16

#: LocalAI's length on the speech routes, which carry no duration: 512 tokens, about 10 s.
SPEECH_ROUTE_TOKENS = 512


class MusicgenBackend(PretrainedBackend):
    name = "transformers-musicgen"
    label = "MusicGen"

    def load(self) -> None:
        self._processor, _ = self._load_pretrained(MusicgenForConditionalGeneration, AutoProcessor)

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
        self._refuse_speed(request)
        inputs = self._processor(text=[request.text], padding=True, return_tensors="pt")
        options: dict = {"max_new_tokens": self._max_new_tokens(request.duration_seconds)}
        if request.guidance_scale is not None:
            options["guidance_scale"] = request.guidance_scale
        if request.do_sample is not None:
            options["do_sample"] = request.do_sample
        audio = self._generate(request.seed, lambda: self.model.generate(**inputs.to(self._device), **options))
        yield pcm16(audio[0, 0].float().cpu().numpy())
