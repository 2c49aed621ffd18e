"""Coqui TTS (the maintained `coqui-tts` fork): VITS, XTTS and the rest of its model zoo.

`parameters.model` is either a released model's name (`tts_models/<lang>/<dataset>/<model>`),
loaded from the TTS_HOME / HF_HOME cache that the image or volume was filled with, or a
checkpoint inside the models directory (a `.pth` file with `config.json` beside it, or a folder
holding both, as XTTS checkpoints come). Nothing is downloaded: a model missing from the cache
fails at load with a message that says where it was looked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

# Before the first huggingface_hub import: a cache miss must fail at once, never start a
# multi-GB download inside a worker. An operator who wants downloads can set it to 0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from TTS.api import TTS
from TTS.utils.manage import ModelManager

from functions.config import ModelConfig, UnsafePathError, resolve_in
from functions.devices import best_device
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    ModelNotFoundError,
    SynthesisRequest,
    pcm16,
)
from functions.saved_voices import saved_voice_details


class CoquiBackend(Backend):
    name = "coqui"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._tts: TTS | None = None
        # Coqui models keep per-call state (VITS's length scale, XTTS's generation caches) and
        # each call already spreads over every core: one synthesis at a time per model.
        self._lock = threading.Lock()
        # Reference WAV (path, mtime, size) -> XTTS conditioning latents, so a cloned voice is
        # encoded once, not on every request.
        self._latents: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        model = self.config.parameters.model
        if not model:
            raise BackendError(
                f"model '{self.config.name}': parameters.model names no Coqui model or checkpoint"
            )
        local = self._local_checkpoint(model)
        try:
            if local is not None:
                checkpoint, config_path = local
                self._tts = TTS(model_path=str(checkpoint), config_path=str(config_path),
                                progress_bar=False)
            else:
                self._check_cached(model)
                self._tts = TTS(model, progress_bar=False)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"model '{self.config.name}': Coqui could not load '{model}': {exc}") from exc
        self._tts.eval()

    def to_device(self) -> None:
        self.tts.to(best_device())

    def _local_checkpoint(self, model: str) -> tuple[Path, Path] | None:
        """(checkpoint, config.json) when `model` names a file or folder in the models directory."""
        try:
            path = resolve_in(self.models_dir, model)
        except UnsafePathError:
            return None
        if path.is_dir():
            config_path = path / "config.json"
            if not config_path.is_file():
                raise BackendError(f"model '{self.config.name}': {model}/config.json is missing")
            return path, config_path
        if path.is_file():
            config_path = path.with_name("config.json")
            if not config_path.is_file():
                raise BackendError(
                    f"model '{self.config.name}': config.json is missing beside {model}"
                )
            return path, config_path
        return None

    def _check_cached(self, name: str) -> None:
        """Refuse, with a useful message, a released model that is not in the local cache."""
        manager = ModelManager(progress_bar=False)
        parts = name.split("/")
        item = manager.models_dict
        for part in parts:
            item = item.get(part) if isinstance(item, dict) else None
        if len(parts) != 4 or not isinstance(item, dict):
            raise ModelNotFoundError(
                f"model '{self.config.name}': '{name}' is neither a file in the models directory "
                "nor a released Coqui model name (tts_models/<language>/<dataset>/<model>)"
            )
        folder = manager.output_prefix / "--".join(parts)
        if item.get("tos_required") and not (
            os.environ.get("COQUI_TOS_AGREED") == "1" or (folder / "tos_agreed.txt").exists()
        ):
            raise BackendError(
                f"model '{self.config.name}': '{name}' is under the Coqui Public Model License; "
                "set COQUI_TOS_AGREED=1 to accept it"
            )
        if "repo_id" in item:
            self._check_hugging_face_cache(name, item)
            return
        missing = [n for n in (name, item.get("default_vocoder")) if n
                   and not (manager.output_prefix / "--".join(n.split("/"))).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"model '{self.config.name}': {', '.join(missing)} not found under "
                f"{manager.output_prefix} (TTS_HOME); fill the cache when building the image or "
                "volume, nothing is downloaded at run time"
            )

    def _check_hugging_face_cache(self, name: str, item: dict) -> None:
        """Models such as XTTS v2 load from the Hugging Face cache (HF_HOME)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot_download(item["repo_id"], revision=item.get("revision"), local_files_only=True)
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"model '{self.config.name}': '{name}' ({item['repo_id']}) is not in the Hugging "
                "Face cache (HF_HOME); fill it when building the image or volume, nothing is "
                "downloaded at run time"
            ) from None

    @property
    def tts(self) -> TTS:
        if self._tts is None:
            raise BackendError("the Coqui model is not loaded")
        return self._tts

    @property
    def _model(self):
        return self.tts.synthesizer.tts_model

    @property
    def _is_xtts(self) -> bool:
        return hasattr(self._model, "get_conditioning_latents")

    @property
    def sample_rate(self) -> int:
        return int(self.tts.synthesizer.output_sample_rate)

    # -- voices and languages ----------------------------------------------------------------

    def _speakers(self) -> list[str]:
        manager = getattr(self._model, "speaker_manager", None)
        return list(manager.speaker_names) if manager is not None else []

    def _supports_cloning(self) -> bool:
        return bool(getattr(self._model.config, "supports_cloning", False))

    def _default_voice(self) -> str | None:
        # LocalAI's later configs name the cloning reference `tts.audio_path`.
        extra = self.config.tts.model_extra or {}
        return self.config.tts.voice or extra.get("audio_path")

    def voices(self) -> list[str]:
        names = self._speakers()
        default = self._default_voice()
        if default and default not in names:
            names.append(default)
        return names

    def languages(self) -> list[str]:
        return list(self.tts.languages or [])

    def _language(self, requested: str | None) -> str | None:
        languages = self.languages()
        if not self.tts.is_multi_lingual or not languages:
            # A one-language model speaks its language whatever the config's `language` says.
            return None
        wanted = requested or os.environ.get("COQUI_LANGUAGE") or None
        if wanted is None:
            raise InvalidRequestError(
                f"model '{self.config.name}' is multilingual: give a language "
                f"({', '.join(languages)})",
                param="language",
            )
        by_lower = {lang.lower(): lang for lang in languages}
        key = wanted.lower().replace("_", "-")
        if key in by_lower:
            return by_lower[key]
        base = key.split("-")[0]
        if base in by_lower:  # en-US -> en
            return by_lower[base]
        regional = [lang for low, lang in by_lower.items() if low.split("-")[0] == base]
        if len(regional) == 1:  # zh -> zh-cn
            return regional[0]
        raise InvalidRequestError(
            f"language '{wanted}' is not offered by model '{self.config.name}'; "
            f"available: {', '.join(languages)}",
            param="language",
        )

    def _reference(self, voice: str) -> Path:
        """A cloning reference: a WAV inside the models directory, never outside it."""
        try:
            path = resolve_in(self.models_dir, voice)
        except UnsafePathError as exc:
            raise InvalidRequestError(f"voice '{voice}': {exc}", param="voice") from None
        if not path.is_file():
            speakers = self._speakers()
            offered = f"; speakers: {', '.join(speakers)}" if speakers else ""
            raise InvalidRequestError(
                f"voice '{voice}' is neither a speaker of model '{self.config.name}' nor a "
                f"reference audio file in the models directory{offered}",
                param="voice",
            )
        return path

    def _xtts_latents(self, voice: str) -> tuple[torch.Tensor, torch.Tensor]:
        presets = self._model.speaker_manager.speakers if self._model.speaker_manager else {}
        if voice in presets:
            latents = presets[voice]
            return latents["gpt_cond_latent"], latents["speaker_embedding"]
        path = self._reference(voice)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._latents:
            self._latents[key] = self._kept_latents(path) or self._encoded_latents(path)
        return self._latents[key]

    def _encoded_latents(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        config = self._model.config
        latents = self._model.get_conditioning_latents(
            audio_path=str(path),
            max_ref_length=config.max_ref_len,
            gpt_cond_len=config.gpt_cond_len,
            gpt_cond_chunk_len=config.gpt_cond_chunk_len,
            sound_norm_refs=config.sound_norm_refs,
        )
        kept = self._latents_file(path)
        if kept is not None:
            # Beside the recording, so that every worker and container after this one (a restart,
            # a Modal scale-up) skips the encoding. Written whole or not at all; a read-only
            # volume just keeps nothing.
            partial = kept.with_name(f".{kept.name}.{os.getpid()}")
            with contextlib.suppress(OSError):
                torch.save({"gpt_cond_latent": latents[0], "speaker_embedding": latents[1]}, partial)
                partial.replace(kept)
        return latents

    def _kept_latents(self, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        kept = self._latents_file(path)
        if kept is None or not kept.is_file():
            return None
        try:
            latents = torch.load(kept, weights_only=True)
        except Exception:
            return None  # a damaged file is encoded again
        return latents["gpt_cond_latent"], latents["speaker_embedding"]

    def _latents_file(self, path: Path) -> Path | None:
        """Where a saved voice's (the voice library's: a folder with its voice.json) latents are
        kept for this model; None for any other recording, which is not ours to write beside."""
        if saved_voice_details(path) is None:
            return None
        checkpoint = hashlib.sha256(str(self.config.parameters.model).encode()).hexdigest()[:16]
        return path.with_name(f"xtts-latents-{checkpoint}.pt")

    # -- synthesis ---------------------------------------------------------------------------

    def synthesize(self, request: SynthesisRequest) -> Iterator[bytes]:
        language = self._language(request.language)
        voice = request.voice or self._default_voice()
        # Held until the last piece is out: a consumer that stops early (a client that left)
        # closes this generator, which releases it.
        with self._lock:
            if self._is_xtts:
                pieces = self._synthesize_xtts(request, language, voice)
            else:
                pieces = [self._synthesize_generic(request, language, voice)]
            for wav in pieces:
                yield pcm16(wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else wav)

    def _synthesize_xtts(self, request: SynthesisRequest, language: str | None,
                         voice: str | None) -> Iterator:
        """The chunk's audio: whole, or piece by piece as XTTS makes it (`tts.stream`)."""
        if voice is None:
            speakers = self._speakers()
            if not speakers:
                raise InvalidRequestError(
                    f"model '{self.config.name}' clones a voice: give `voice` as a reference WAV "
                    "in the models directory",
                    param="voice",
                )
            voice = speakers[0]
        gpt_cond_latent, speaker_embedding = self._xtts_latents(voice)
        config = self._model.config
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling = {
            "temperature": config.temperature,
            "length_penalty": config.length_penalty,
            "repetition_penalty": config.repetition_penalty,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "speed": request.speed,
        }
        if self.config.tts.stream:
            # A piece every 20 audio tokens (about 0.9 s of speech), XTTS's own default.
            yield from self._model.inference_stream(request.text, language, gpt_cond_latent,
                                                    speaker_embedding, **sampling)
        else:
            yield self._model.inference(request.text, language, gpt_cond_latent, speaker_embedding,
                                        **sampling)["wav"]

    def _synthesize_generic(self, request: SynthesisRequest, language: str | None, voice: str | None):
        speakers = self._speakers()
        speaker, speaker_wav = None, None
        if self.tts.is_multi_speaker and voice in speakers:
            speaker = voice
        elif voice is not None and self._supports_cloning():
            speaker_wav = str(self._reference(voice))
        elif voice is not None and speakers:
            raise InvalidRequestError(
                f"voice '{voice}' is not offered by model '{self.config.name}'; "
                f"available: {', '.join(speakers)}",
                param="voice",
            )
        elif self.tts.is_multi_speaker and speakers:
            # OpenAI clients always send a voice name; one the config does not map gets the
            # model's first speaker rather than an error.
            speaker = speakers[0]
        model = self._model
        base_scale = getattr(model, "length_scale", None)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        try:
            if base_scale is not None:
                # VITS and Glow-TTS stretch durations by this scale: faster is shorter.
                model.length_scale = base_scale / request.speed
            return self.tts.tts(
                request.text,
                speaker=speaker,
                language=language,
                speaker_wav=speaker_wav,
                split_sentences=False,
            )
        except KeyError as exc:
            # Coqui reports an unknown speaker or language id as a bare KeyError.
            raise InvalidRequestError(
                f"model '{self.config.name}' does not know {exc}", param="voice"
            ) from exc
        finally:
            if base_scale is not None:
                model.length_scale = base_scale
