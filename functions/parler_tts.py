"""Parler-TTS: speech in the voice a sentence describes ("A female speaker with a low-pitched
voice..."). The description comes from the request's `instructions` or `voice`, else the config's
`tts.voice`, else LocalAI's default."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import AutoTokenizer

from functions.batching import Prepared
from functions.devices import cuda_hidden
from functions.pretrained import PretrainedBackend
from functions.protocol import SynthesisRequest, pcm16

with cuda_hidden():  # its audiotools dependency asks CUDA for a default device at import
    from parler_tts import ParlerTTSForConditionalGeneration

#: LocalAI's description when a request gives none.
DEFAULT_DESCRIPTION = (
    "A female speaker with a slightly low-pitched voice delivers her words quite expressively, "
    "in a very confined sounding environment with clear audio quality. She speaks very fast."
)


class ParlerBackend(PretrainedBackend):
    name = "parler-tts"
    label = "Parler-TTS"

    def load(self) -> None:
        self._tokenizer, _ = self._load_pretrained(ParlerTTSForConditionalGeneration, AutoTokenizer)

    @property
    def sample_rate(self) -> int:
        return self.model.config.sampling_rate

    def voices(self) -> list[str]:
        # Any description is a voice; there is no list to offer.
        return []

    def prepare(self, request: SynthesisRequest) -> Prepared:
        self._refuse_speed(request, '; describe the pace in the voice description instead ("speaks slowly")')
        description = request.instructions or request.voice or DEFAULT_DESCRIPTION
        return Prepared((description, request.text), seed=request.seed)

    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        descriptions, texts = zip(*(item.inputs for item in batch), strict=True)
        described = self._tokenizer(list(descriptions), padding=True, return_tensors="pt").to(self._device)
        prompt = self._tokenizer(list(texts), padding=True, return_tensors="pt").to(self._device)
        # Each clip ends at its own end-of-audio token: the library says where, the rest is padding.
        generated = self._generate(batch, lambda: self.model.generate(
            input_ids=described.input_ids,
            attention_mask=described.attention_mask,
            prompt_input_ids=prompt.input_ids,
            prompt_attention_mask=prompt.attention_mask,
            return_dict_in_generate=True,
        ))
        return [pcm16(clip[:length].float().cpu().numpy())
                for clip, length in zip(generated.sequences, generated["audios_length"], strict=True)]
