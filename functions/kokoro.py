"""Kokoro-82M through kokoro-onnx: one ONNX model file and one voices file (an .npz of style
vectors, one per voice), phonemised by the espeak-ng that espeakng-loader bundles. No torch, and
nothing is fetched at run time: both files come from the models directory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
from kokoro_onnx import Kokoro
from kokoro_onnx.config import SAMPLE_RATE

from functions.config import ModelConfig, resolve_in
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    ModelNotFoundError,
    Spoken,
    SynthesisRequest,
    pcm16,
)
from functions.word_times import WordTiming

DEFAULT_VOICE = "af_heart"
#: A voice's first letter is its language (Kokoro's naming): espeak-ng's name for it.
VOICE_LANGUAGES = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "j": "ja",
                   "p": "pt-br", "z": "cmn"}
#: Languages as requests name them (ISO 639-1, or espeak's own) -> espeak-ng's name.
LANGUAGES = {"en": "en-us", "en-us": "en-us", "en-gb": "en-gb", "es": "es", "fr": "fr-fr", "fr-fr": "fr-fr",
             "hi": "hi", "it": "it", "ja": "ja", "pt": "pt-br", "pt-br": "pt-br", "zh": "cmn", "cmn": "cmn"}
#: kokoro-onnx refuses speeds outside this range.
SPEEDS = (0.5, 2.0)
#: The pause kokoro-onnx puts between sentences, kept where Chorus speaks them one by one.
SENTENCE_PAUSE = 0.25
MAX_MIX = 8
# Kokoro-FastAPI's weighted mix: `af_bella(2)+af_sky(1)`; a voice with no weight weighs 1.
_MIX_PART = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\(\s*(\d+(?:\.\d*)?|\.\d+)\s*\))?\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")


class KokoroBackend(Backend):
    name = "kokoro"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._kokoro: Kokoro | None = None
        self._model_path: Path | None = None
        self._voices_path: Path | None = None
        #: Each voice's style table, read once at load: kokoro-onnx keeps the .npz open and reads it
        #: lazily through one file, which threads must not share.
        self._voices: dict[str, np.ndarray] = {}

    def load(self) -> None:
        model_path, voices_path = (resolve_in(self.models_dir, name) for name in self.config.kokoro_files())
        for path in (model_path, voices_path):
            if not path.is_file():
                raise ModelNotFoundError(f"model '{self.config.name}': {path.name} is missing from the models "
                                         "directory (chorus models pull kokoro fetches both files)")
        self._model_path, self._voices_path = model_path, voices_path
        with np.load(voices_path) as voices:
            self._voices = {name: np.asarray(voices[name], dtype=np.float32) for name in voices.files}
        if not self._voices:
            raise ModelNotFoundError(f"model '{self.config.name}': {voices_path.name} holds no voice")
        self._kokoro = self._on(["CPUExecutionProvider"])

    def _on(self, providers: list[str]) -> Kokoro:
        session = onnxruntime.InferenceSession(str(self._model_path), providers=providers)
        kokoro = Kokoro.from_session(session, str(self._voices_path))
        kokoro.voices.close()  # its own lazy copy: the tables read at load serve instead
        kokoro.voices = self._voices
        return kokoro

    def to_device(self) -> None:
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            self._kokoro = self._on(["CUDAExecutionProvider", "CPUExecutionProvider"])

    @property
    def kokoro(self) -> Kokoro:
        if self._kokoro is None:
            raise BackendError("the Kokoro model is not loaded")
        return self._kokoro

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def voices(self) -> list[str]:
        return sorted(self.kokoro.voices)

    def synthesize(self, request: SynthesisRequest) -> Iterator[Spoken]:
        names, style = self._style(request.voice or self.config.tts.voice or self._default_voice())
        # The config's language is the default of voices that do not say theirs: Kokoro's do.
        asked = None if request.language == self.config.parameters.language else request.language
        language = self._language(asked, names[0])
        if not SPEEDS[0] <= request.speed <= SPEEDS[1]:
            raise InvalidRequestError(f"Kokoro speaks at speeds from {SPEEDS[0]} to {SPEEDS[1]}, not {request.speed}",
                                      param="speed")
        sentences = [s for s in _SENTENCE_END.split(request.text.strip()) if s.strip()]
        timing = WordTiming(request.text) if request.word_times else None
        samples = 0
        for sentence in sentences:
            try:
                audio, _, phonemes = self.kokoro.create_timed(sentence, voice=style, speed=request.speed,
                                                              lang=language)
            except ValueError as exc:
                # Text that phonemises to nothing the model knows (only symbols, say).
                raise InvalidRequestError(f"Kokoro cannot speak {sentence[:80]!r}: {exc}", param="input") from None
            # Trimmed at both ends: the pause a sentence ends with is put back, also after the
            # request's last one, since the router's next chunk follows it.
            if _SENTENCE_END.search(sentence + " "):
                audio = np.concatenate([audio, np.zeros(int(SENTENCE_PAUSE * SAMPLE_RATE), dtype=audio.dtype)])
            if timing is not None and (words := timing.sentence(_spans(phonemes) if phonemes else None, samples)):
                yield words
            pcm = pcm16(audio)
            samples += len(pcm) // 2
            yield pcm

    def _default_voice(self) -> str:
        return DEFAULT_VOICE if DEFAULT_VOICE in self.kokoro.voices else self.voices()[0]

    def _style(self, voice: str) -> tuple[list[str], np.ndarray]:
        """A voice, or a weighted mix of voices (`af_bella(2)+af_sky(1)`), as its names and
        its style vectors: the mix is the weighted mean of its voices'."""
        parts = [_MIX_PART.match(part) for part in voice.split("+")]
        if len(parts) > MAX_MIX or not all(parts):
            raise InvalidRequestError(
                f"voice '{voice[:80]}' is neither a voice of model '{self.config.name}' nor a mix of at most "
                f"{MAX_MIX} of them like af_bella(2)+af_sky(1)", param="voice")
        names = [part[1] for part in parts]
        weights = [float(part[2]) if part[2] else 1.0 for part in parts]
        unknown = [name for name in names if name not in self.kokoro.voices]
        if unknown:
            raise InvalidRequestError(
                f"voice '{unknown[0]}' is not offered by model '{self.config.name}'; available: "
                f"{', '.join(self.voices())}", param="voice")
        if not all(weights):
            raise InvalidRequestError(f"voice '{voice[:80]}': every weight of a mix must be above 0", param="voice")
        styles = [self.kokoro.voices[name] * weight for name, weight in zip(names, weights, strict=True)]
        return names, np.sum(styles, axis=0) / sum(weights)

    @staticmethod
    def _language(asked: str | None, voice: str) -> str:
        """The request's language, else the voice's. `en` with a British voice stays British:
        a bare language takes the voice's variant of it."""
        own = VOICE_LANGUAGES.get(voice[:1], "en-us")
        if asked is None:
            return own
        language = LANGUAGES.get(asked.lower().replace("_", "-"))
        if language is None:
            raise InvalidRequestError(f"Kokoro does not speak language '{asked[:40]}'; it speaks "
                                      f"{', '.join(sorted(LANGUAGES))}", param="language")
        if "-" not in asked and own.split("-")[0] == language.split("-")[0]:
            return own
        return language


def _spans(phonemes: list) -> list[tuple[str, int, int]]:
    """kokoro-onnx's phoneme timings (seconds) as sample spans."""
    return [(p.phoneme, round(p.start * SAMPLE_RATE), round(p.end * SAMPLE_RATE)) for p in phonemes]
