"""The one contract between the router and every synthesis backend.

A backend is built from a model config and the models directory, loads once, and turns a
`SynthesisRequest` into a stream of PCM chunks: signed 16-bit little-endian mono `bytes` at
`sample_rate`. Plain bytes travel unchanged in-process, over the worker's HTTP protocol and
through Modal, so no layer needs to convert them.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from functions.config import ModelConfig

SAMPLE_FORMAT = "s16le"


def pcm16(samples: object) -> bytes:
    """Float samples in [-1, 1] (an array of any shape, read as one mono signal) as PCM."""
    # Imported here: the router reads this module and never makes audio.
    import numpy as np

    samples = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (samples * 32767).astype("<i2").tobytes()


class SynthesisRequest(BaseModel):
    """One synthesis job after the API family's wire schema has been translated.

    Overrides are already applied: `voice` and `language` are the request's values where it
    gave them and the config's otherwise, so a backend never needs to know which API asked.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    text: str
    voice: str | None = None
    language: str | None = None
    speed: float = Field(1.0, gt=0)
    instructions: str | None = None
    seed: int | None = None
    #: Sound generation (backends whose input is a prompt): the clip's length, the
    #: classifier-free guidance scale and whether to sample; None keeps the model's default.
    duration_seconds: float | None = Field(None, gt=0)
    guidance_scale: float | None = Field(None, ge=0)
    do_sample: bool | None = None
    #: Ask for `WordTimes` where the backend measures them (the timestamp routes).
    word_times: bool = False


@dataclass(frozen=True)
class WordTimes:
    """Where words of the request's text fall in its audio, as the model measured it (Piper's
    phoneme alignments). A backend that can measure them yields one, when the request asks for
    `word_times`, just before the audio it describes. Each word is (its first character, the
    character after it) in `request.text` and (its first sample, the sample after it) counted
    from the start of the request's audio."""

    words: tuple[tuple[int, int, int, int], ...]


#: What a backend's stream carries: PCM, and word times where they were asked for.
Spoken = bytes | WordTimes

#: The worker's media type for a request that asks for word times: frames of one kind byte
#: (b"a" PCM, b"w" WordTimes as JSON), a 4-byte big-endian length, then that many bytes.
FRAMED_MEDIA_TYPE = "application/x-chorus-framed-pcm"
_FRAME_HEAD = struct.Struct(">cI")


def frame(item: Spoken) -> bytes:
    if isinstance(item, WordTimes):
        payload = json.dumps(item.words, separators=(",", ":")).encode()
        return _FRAME_HEAD.pack(b"w", len(payload)) + payload
    return _FRAME_HEAD.pack(b"a", len(item)) + item


class FrameReader:
    """Frames back into items, from network reads that split them anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Spoken]:
        self._buffer += data
        items: list[Spoken] = []
        while len(self._buffer) >= _FRAME_HEAD.size:
            kind, size = _FRAME_HEAD.unpack_from(self._buffer)
            end = _FRAME_HEAD.size + size
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_FRAME_HEAD.size:end])
            del self._buffer[:end]
            if kind == b"a":
                items.append(payload)
            elif kind == b"w":
                items.append(WordTimes(tuple(tuple(word) for word in json.loads(payload))))
            else:
                raise ValueError(f"unknown frame kind {kind!r}")
        return items

    @property
    def partial(self) -> bool:
        """Whether a frame was cut off: the stream ended early."""
        return bool(self._buffer)


class BackendError(Exception):
    """Synthesis failed for a reason the caller cannot fix by changing the request."""


class InvalidRequestError(ValueError):
    """The request asks for something this model cannot do (unknown voice, language...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BackendUnavailableError(BackendError):
    """The backend's library is not installed in this environment."""


class ModelNotFoundError(BackendError):
    """The model's files are not where the backend looks for them (nothing is downloaded)."""


#: Each backend failure's one code and HTTP status, most specific first. The worker answers
#: with them; every runner turns a code back into the router's error of that code
#: (router/errors.py), so no host or runner keeps a mapping of its own.
FAILURES: tuple[tuple[type[Exception], str, int], ...] = (
    (InvalidRequestError, "invalid_request", 400),
    (ModelNotFoundError, "model_not_found", 404),
    (BackendUnavailableError, "backend_unavailable", 503),
    (BackendError, "synthesis_failed", 500),
)
STATUS: dict[str, int] = {code: status for _, code, status in FAILURES}


def failure_code(exc: BaseException) -> str:
    """The code of what a backend raised; anything else (a library's own error) failed synthesis."""
    return next((code for kind, code, _ in FAILURES if isinstance(exc, kind)), "synthesis_failed")


class Backend(ABC):
    """Load once with `load()` and `to_device()`, then `synthesize()` any number of requests,
    possibly from several threads at once."""

    #: The backend's name as configs spell it (`backend:` in the YAML).
    name: str

    def __init__(self, config: ModelConfig, models_dir: Path):
        self.config = config
        self.models_dir = models_dir

    @abstractmethod
    def load(self) -> None:
        """Load weights and voices into host memory. Called once, before any synthesis; asks
        nothing of CUDA (on Modal it runs before a memory snapshot, where no GPU is attached)."""

    def to_device(self) -> None:  # noqa: B027 - a backend that runs on the CPU has nothing to move
        """Move the loaded weights to the GPU where there is one. Called once, after `load()`."""

    @property
    @abstractmethod
    def sample_rate(self) -> int:
        """Rate of the PCM that `synthesize` yields. Valid after `load()`."""

    @abstractmethod
    def voices(self) -> list[str]:
        """Voice names this model accepts as `SynthesisRequest.voice`. Valid after `load()`."""

    @abstractmethod
    def synthesize(self, request: SynthesisRequest) -> Iterator[Spoken]:
        """Yield PCM chunks as soon as each is ready, so the caller can stream and stop early;
        and, where the request asks for them and the model measures them, `WordTimes`."""

    def release_memory(self) -> None:  # noqa: B027 - most backends keep no pool of their own
        """Give back what past syntheses left in the backend's own memory pools (an ONNX
        Runtime arena sized by the largest one). Called in a worker thread once no synthesis
        has run for a while; one may start meanwhile."""
