"""VALL-E X (`tts-webui-valle-x`, a packaging of Plachtaa/VALL-E-X): English, Chinese and
Japanese speech, and voice cloning from a few seconds of reference audio.

Weights are never downloaded. The package's own loaders read them from:
  - the VALL-E X checkpoint: `parameters.model` when it names a file in the models directory,
    else `<models>/vall-e-x/vallex-checkpoint.pt`;
  - EnCodec: torch hub's cache (`$TORCH_HOME/hub/checkpoints/encodec_24khz-d7cc33bc.th`);
  - Vocos: the Hugging Face cache (`$HF_HOME`, repository charactr/vocos-encodec-24khz).

A cloned voice (`tts.vall-e.audio_path`, at most 15 s) is encoded once, at load, into a prompt
file kept in a writable cache ($CHORUS_CACHE_DIR, else ~/.cache/chorus), never inside the
installed package. Its transcript comes from `tts.vall-e.transcript`; without one it is
transcribed with Whisper weights from `<models>/whisper/` ($VALLE_WHISPER_MODEL, default medium).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import torch

# Before the first huggingface_hub import: a cache miss must fail at once, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from valle_x.data.tokenizer import tokenize_audio
from valle_x.macros import lang2code, lang2token

from functions.config import ModelConfig, UnsafePathError, resolve_in
from functions.devices import best_device, cuda_hidden
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    ModelNotFoundError,
    SynthesisRequest,
    pcm16,
)
from functions.saved_voices import saved_voice_details

with cuda_hidden():  # it fixes its device at import: the CPU here, the GPU in to_device()
    from valle_x.utils import generation

SAMPLE_RATE = 24000
MAX_REFERENCE_SECONDS = 15.0
LANGUAGES = ("en", "zh", "ja")
CHECKPOINT = Path("vall-e-x") / "vallex-checkpoint.pt"
ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
PRESETS_DIR = Path(generation.__file__).resolve().parent.parent / "presets"

# The package keeps one model in module globals: every config in this process shares it, and
# generation (which reads and writes those globals) runs one request at a time.
_lock = threading.Lock()
_loaded_checkpoint: Path | None = None


def _whisper_model() -> str:
    return os.environ.get("VALLE_WHISPER_MODEL", "medium")


def _cache_dir() -> Path:
    root = os.environ.get("CHORUS_CACHE_DIR") or Path.home() / ".cache" / "chorus"
    return Path(root) / "vall-e-x"


class ValleBackend(Backend):
    name = "vall-e-x"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._prompt: Path | None = None

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        checkpoint = self._checkpoint()
        encodec = Path(torch.hub.get_dir()) / "checkpoints" / ENCODEC_CHECKPOINT
        if not encodec.is_file():
            raise ModelNotFoundError(
                f"model '{self.config.name}': EnCodec weights are missing: expected {encodec} "
                "(TORCH_HOME); nothing is downloaded at run time"
            )
        global _loaded_checkpoint
        with _lock:
            if _loaded_checkpoint != checkpoint:
                try:
                    generation.preload_models(
                        checkpoints_dir=str(checkpoint.parent),
                        model_checkpoint_name=checkpoint.name,
                    )
                except Exception as exc:
                    raise BackendError(
                        f"model '{self.config.name}': VALL-E X could not load: {exc} (Vocos is "
                        "read from the Hugging Face cache, HF_HOME)"
                    ) from exc
                _loaded_checkpoint = checkpoint
            if self.config.tts.vall_e.audio_path:
                self._prompt = self._make_prompt(self.config.tts.vall_e.audio_path, self.config.tts.vall_e.transcript)

    def to_device(self) -> None:
        device = torch.device(best_device())
        with _lock:
            if generation.device == device:
                return
            # What preload_models put on the import-time device, and generate_audio's own.
            generation.model.to(device)
            generation.codec.codec.to(device)
            generation.codec._device = device
            generation.vocos.to(device)
            generation.device = device

    def _checkpoint(self) -> Path:
        model = self.config.parameters.model
        if model:
            try:
                path = resolve_in(self.models_dir, model)
            except UnsafePathError as exc:
                raise BackendError(f"model '{self.config.name}': {exc}") from None
            if path.is_file():
                return path
        # LocalAI's configs give a voice name here, not a file: use the standard place.
        path = resolve_in(self.models_dir, str(CHECKPOINT))
        if not path.is_file():
            raise ModelNotFoundError(
                f"model '{self.config.name}': the VALL-E X checkpoint is missing: put "
                f"vallex-checkpoint.pt in the models directory under {CHECKPOINT.parent}/"
            )
        return path

    def _make_prompt(self, audio_path: str, configured: str | None, trim: bool = False) -> Path:
        """Encode the reference audio and its transcript (`configured`, else Whisper's) into a
        prompt file, the way the package's make_prompt does, but saved in a writable cache and
        reused across restarts. `trim` cuts a longer recording to what VALL-E X clones from
        (a saved voice's; a config's is refused, as its author can fix it)."""
        try:
            path = resolve_in(self.models_dir, audio_path)
        except UnsafePathError as exc:
            raise BackendError(f"model '{self.config.name}': tts.vall-e.audio_path: {exc}") from None
        if not path.is_file():
            raise BackendError(
                f"model '{self.config.name}': tts.vall-e.audio_path '{audio_path}' is not a file "
                "in the models directory"
            )
        data = path.read_bytes()
        try:
            audio, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:
            raise BackendError(f"model '{self.config.name}': cannot read '{audio_path}': {exc}") from exc
        if trim:
            audio = audio[: int(MAX_REFERENCE_SECONDS * sr)]
        seconds = audio.shape[0] / sr
        if seconds > MAX_REFERENCE_SECONDS:
            raise BackendError(
                f"model '{self.config.name}': the reference audio '{audio_path}' lasts "
                f"{seconds:.1f} s; VALL-E X clones from at most {MAX_REFERENCE_SECONDS:.0f} s"
            )
        # Keyed by the audio and what decides its words (the transcript, or the Whisper model
        # that will hear them), so that a cached prompt spares the transcription too.
        words = configured or f"whisper:{_whisper_model()}"
        digest = hashlib.sha256(data + b"\0" + words.encode() + (b"\0trim" if trim else b"")).hexdigest()[:16]
        target = _cache_dir() / f"{self.config.name}-{digest}.npz"
        if target.is_file():
            return target
        transcript = configured or self._transcribe(path)

        wav = torch.from_numpy(audio.T.mean(axis=0, keepdims=True))
        if wav.abs().max() > 1:
            wav = wav / wav.abs().max()
        language = generation.langid.classify(transcript)[0]
        text = lang2token[language] + transcript + lang2token[language]
        frames = tokenize_audio(generation.codec, (wav, sr))
        audio_tokens = frames[0][0].transpose(2, 1).cpu().numpy()
        phonemes, _ = generation.text_tokenizer.tokenize(text=text.strip())
        text_tokens, _ = generation.text_collater([phonemes])
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.npz")
        np.savez(partial, audio_tokens=audio_tokens, text_tokens=text_tokens,
                 lang_code=lang2code[language])
        partial.replace(target)
        return target

    def _transcribe(self, path: Path) -> str:
        name = _whisper_model()
        weights = self.models_dir / "whisper" / f"{name}.pt"
        if not weights.is_file():
            raise BackendError(
                f"model '{self.config.name}': set tts.vall-e.transcript to the words spoken in "
                f"the reference audio, or put Whisper's {name}.pt in the models directory under "
                "whisper/ to transcribe it"
            )
        import whisper

        model = whisper.load_model(str(weights), device="cpu")
        text = model.transcribe(str(path), fp16=False)["text"].strip()
        if not text:
            raise BackendError(
                f"model '{self.config.name}': Whisper heard no words in the reference audio; "
                "set tts.vall-e.transcript"
            )
        return text

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    # -- voices ------------------------------------------------------------------------------

    def _cloned_name(self) -> str:
        return self.config.tts.voice or self.config.name

    def _presets(self) -> list[str]:
        return sorted(p.stem for p in PRESETS_DIR.glob("*.npz"))

    def voices(self) -> list[str]:
        cloned = [self._cloned_name()] if self._prompt is not None else []
        return cloned + self._presets()

    def _prompt_for(self, voice: str | None) -> str | None:
        if voice is None or voice == self._cloned_name():
            return str(self._prompt) if self._prompt is not None else None
        if voice in self._presets():
            return str(PRESETS_DIR / f"{voice}.npz")
        if (saved := self._saved_prompt(voice)) is not None:
            return saved
        raise InvalidRequestError(
            f"voice '{voice}' is not offered by model '{self.config.name}'; "
            f"available: {', '.join(self.voices())}",
            param="voice",
        )

    def _saved_prompt(self, voice: str) -> str | None:
        """The prompt of a saved voice of the library (its recording's path), encoded on its
        first use; None for any other voice."""
        try:
            details = saved_voice_details(resolve_in(self.models_dir, voice))
        except UnsafePathError:
            return None
        if details is None:
            return None
        transcript = details.get("transcript")
        if not transcript and not (self.models_dir / "whisper" / f"{_whisper_model()}.pt").is_file():
            raise InvalidRequestError(
                f"model '{self.config.name}' needs the words spoken in voice '{details.get('name')}': save it "
                "with its transcript", param="transcript")
        with _lock:
            return str(self._make_prompt(voice, transcript, trim=True))

    @staticmethod
    def _language(requested: str | None) -> str:
        if not requested or requested.lower() == "auto":
            return "auto"
        base = requested.lower().replace("_", "-").split("-")[0]
        if base not in LANGUAGES:
            raise InvalidRequestError(
                f"language '{requested}' is not spoken by VALL-E X; available: {', '.join(LANGUAGES)}",
                param="language",
            )
        return base

    # -- synthesis ---------------------------------------------------------------------------

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        if self._prompt is None and self.config.tts.vall_e.audio_path:
            raise BackendError(f"model '{self.config.name}' is not loaded")
        prompt = self._prompt_for(request.voice)
        language = self._language(request.language)
        with _lock:
            if request.seed is not None:
                torch.manual_seed(request.seed)
            samples = generation.generate_audio(request.text, prompt=prompt, language=language)
        yield pcm16(samples)
