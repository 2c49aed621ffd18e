"""MusicGen through transformers: a text prompt describing music or a sound becomes audio
(32 kHz mono for the public checkpoints). The prompt is the whole input, never split."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import AutoProcessor, MusicgenForConditionalGeneration

from functions.batching import Prepared
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

    def _samples(self, tokens: int) -> int:
        """The samples `tokens` generated tokens decode to (the codebook delay's steps make none)."""
        codec = self.model.config.audio_encoder
        frames = tokens - (self.model.decoder.config.num_codebooks - 1)
        return max(0, frames) * round(codec.sampling_rate / codec.frame_rate)

    def prepare(self, request: SynthesisRequest) -> Prepared:
        self._refuse_speed(request)
        options: dict = {}
        if request.guidance_scale is not None:
            options["guidance_scale"] = request.guidance_scale
        if request.do_sample is not None:
            options["do_sample"] = request.do_sample
        return Prepared((request.text, self._max_new_tokens(request.duration_seconds)),
                        tuple(sorted(options.items())), request.seed)

    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        # Padded prompts with their attention mask; every clip is generated to the longest one's
        # length and cut back to its own.
        prompts, lengths = zip(*(item.inputs for item in batch), strict=True)
        inputs = self._processor(text=list(prompts), padding=True, return_tensors="pt").to(self._device)
        options = {**dict(batch[0].key), "max_new_tokens": max(lengths)}
        audio = self._generate(batch, lambda: self.model.generate(**inputs, **options))
        return [pcm16(clip[0, :self._samples(tokens)].float().cpu().numpy()) for clip, tokens in zip(audio, lengths, strict=True)]
