"""The voice library: voices users bring, one store behind every API family's front door.

A saved voice is a reference recording a cloning model speaks with: the uploaded audio (any
format FFmpeg reads) decoded with PyAV, mixed to mono, resampled to REFERENCE_RATE and trimmed to
REFERENCE_SECONDS, with its name, labels, language, transcript, consent and the models that may
use it. Each lives in `<models>/voices/<id>/` (reference.wav, voice.json): the models directory is
the volume the router, the workers and Modal's containers share, so a backend reads the reference
by its path there exactly as it reads a config's speaker WAV. A voice is written in a hidden
folder and renamed into place, and removed by renaming it away first: a reader sees all of a
voice or none of it, across restarts and concurrent requests.

With API keys set a voice belongs to the key that made it (its hash, never the key): other keys
see no such voice, and admin keys see every one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import shutil
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Protocol

import av
import numpy as np

from functions import clones_voices
from functions.config import ModelConfig
from functions.saved_voices import DETAILS_FILE, REFERENCE_FILE
from router.errors import InvalidRequest, NotFound, StorageFailed, UnsupportedAudio, VoiceNotFound

log = logging.getLogger("chorus")

#: The reference's rate: VALL-E X's codec rate, and XTTS resamples whatever it reads.
REFERENCE_RATE = 24000
#: What a cloning model reads of a reference: XTTS conditions on at most 30 s (max_ref_len).
REFERENCE_SECONDS = 30.0
#: Less than this gives a speaker encoder too little to go on.
MIN_SECONDS = 1.0
#: Uploads longer than this, all files together, are refused rather than silently cut to a few
#: percent of what was sent; decoding also stops here, so a small file that expands to hours
#: (a decompression bomb) costs no more than this.
MAX_UPLOAD_SECONDS = 300.0
#: Files one voice may be made from (ElevenLabs' instant cloning takes up to 25).
MAX_FILES = 25
MAX_NAME_CHARS = 100
MAX_LABELS = 20
MAX_LABEL_CHARS = 100
MAX_TEXT_CHARS = 2000

#: 20 hex digits: ElevenLabs' voice ids are 20 characters too, and the pattern keeps an id from
#: ever naming anything outside its folder.
_ID = re.compile(r"^[0-9a-f]{20}$")
_CONSENT_ID = re.compile(r"^cons_[0-9a-f]{20}$")
_CONSENT_RECORDING = "recording.wav"
_CONSENT_META = "consent.json"
_CONSENTS = "consents"
#: Hidden folders: a voice being written, or one being removed.
_INCOMING, _REMOVED = ".incoming-", ".removed-"
#: An incoming folder this old was left by a process that died mid-write.
_STALE_SECONDS = 3600


@dataclass(frozen=True)
class Caller:
    """Who asks: the hash of the API key presented (None on a server with no keys, or a
    protocol that carries none), and whether that key manages every voice."""

    owner: str | None = None
    admin: bool = False

    @classmethod
    def from_key(cls, key: bytes | None, admin: bool = False) -> Caller:
        return cls(hashlib.sha256(key).hexdigest()[:32] if key else None, admin)


@dataclass(frozen=True)
class Upload:
    """One uploaded file, as a front door received it."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    seconds: float
    owner: str | None = None
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    language: str | None = None
    transcript: str | None = None
    #: The models that may speak it; empty: every cloning model.
    models: tuple[str, ...] = ()
    #: What the user consented with: a consent's id (OpenAI's), or None where none was asked.
    consent: str | None = None
    created: int = 0

    @property
    def reference(self) -> str:
        """The reference recording's path in the models directory, as backends are given it."""
        return f"voices/{self.id}/{REFERENCE_FILE}"

    def visible_to(self, caller: Caller) -> bool:
        return caller.admin or self.owner == caller.owner


@dataclass(frozen=True)
class Consent:
    id: str
    name: str
    language: str
    owner: str | None = None
    created: int = 0


@dataclass(frozen=True)
class VoiceDetails:
    """What a user may say about a voice, on creating or editing it; None leaves it as it is."""

    name: str | None = None
    description: str | None = None
    labels: dict[str, str] | None = None
    language: str | None = None
    transcript: str | None = None
    models: tuple[str, ...] | None = None
    consent: str | None = None

    def check(self) -> VoiceDetails:
        if self.name is not None and not (0 < len(self.name.strip()) <= MAX_NAME_CHARS and self.name.isprintable()):
            raise InvalidRequest(f"'name' must be 1 to {MAX_NAME_CHARS} printable characters", param="name")
        if self.labels is not None and (len(self.labels) > MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_LABEL_CHARS and len(v) <= MAX_LABEL_CHARS
            for k, v in self.labels.items()
        )):
            raise InvalidRequest(f"'labels' must map at most {MAX_LABELS} names to strings of at most "
                                 f"{MAX_LABEL_CHARS} characters", param="labels")
        for param in ("description", "transcript"):
            value = getattr(self, param)
            if value is not None and len(value) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"'{param}' must be at most {MAX_TEXT_CHARS} characters", param=param)
        if self.language is not None and not re.fullmatch(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?", self.language):
            raise InvalidRequest(f"'language' {self.language!r} is not a language code (en, fr, pt-BR)",
                                 param="language")
        return replace(self, name=self.name.strip() if self.name is not None else None)


def in_library(voice: str | None) -> bool:
    """Whether `voice` is a path to a file of the library (LocalAI-style requests may name any
    file of the models directory, a user's own `voices/*.wav` included): only an id names a
    saved voice, its owner checked."""
    parts = PurePosixPath(voice or "").parts
    return len(parts) > 2 and parts[0] == "voices" and (
        _ID.match(parts[1]) is not None or parts[1] == _CONSENTS or parts[1].startswith((_INCOMING, _REMOVED)))


def labels_from_json(text: str | None) -> dict[str, str] | None:
    """Labels as ElevenLabs' forms send them: a JSON object in a text field."""
    if text is None or not text.strip() or text.strip() == "null":  # the SDK sends null for none
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not isinstance(labels, dict):
        raise InvalidRequest("'labels' must be a JSON object of strings, e.g. {\"accent\": \"british\"}",
                             param="labels")
    return labels


def decode_reference(uploads: list[Upload], longest: float = MAX_UPLOAD_SECONDS, param: str = "files") -> np.ndarray:
    """The uploads, one after another, as mono 16-bit samples at REFERENCE_RATE; at most
    `longest` seconds of them in all. Errors name the form field `param`."""
    if not uploads:
        raise InvalidRequest("no audio was uploaded: send at least one file", param=param)
    if len(uploads) > MAX_FILES:
        raise InvalidRequest(f"{len(uploads)} files: a voice is made from at most {MAX_FILES}", param=param)
    limit = int(longest * REFERENCE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    for upload in uploads:
        name = upload.filename
        # The name is never used as a path; one that tries to be is a client to stop, not humour.
        if any(c in name for c in "/\\\x00") or name.startswith(".."):
            raise InvalidRequest(f"file name {name[:80]!r} must be a plain name, not a path", param=param)
        if not upload.data:
            raise InvalidRequest(f"file {name!r} is empty", param=param)
        for samples in _decoded(upload, param):
            parts.append(samples)
            total += len(samples)
            if total > limit:
                raise InvalidRequest(f"the audio lasts more than {longest:.0f} s; send at most {longest:.0f} s "
                                     f"(the first {REFERENCE_SECONDS:.0f} s are used)",
                                     param=param)
    seconds = total / REFERENCE_RATE
    if seconds < MIN_SECONDS:
        raise InvalidRequest(f"the audio lasts {seconds:.2f} s; a voice needs at least {MIN_SECONDS:.0f} s of speech",
                             param=param)
    return np.concatenate(parts)[: int(REFERENCE_SECONDS * REFERENCE_RATE)]


def _decoded(upload: Upload, param: str):
    """`upload`'s audio in mono REFERENCE_RATE pieces; 415 if FFmpeg cannot read it as audio."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=REFERENCE_RATE)
    try:
        with av.open(io.BytesIO(upload.data), "r") as container:
            if not container.streams.audio:
                raise UnsupportedAudio(f"file {upload.filename!r} holds no audio", param=param)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):
            yield out.to_ndarray().reshape(-1)
    except av.FFmpegError as exc:
        raise UnsupportedAudio(
            f"file {upload.filename!r} is not audio Chorus can decode (mp3, wav, ogg, aac, flac, webm, mp4): "
            f"{exc.strerror or exc}", param=param) from None


def _wav(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(REFERENCE_RATE)
        writer.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


class SharedVolume(Protocol):
    """A models directory that other hosts mount too, whose changes they see only once committed
    (Modal's Volume). Blocking: called from worker threads, as the library's writes are."""

    def commit(self) -> None: ...


@contextlib.contextmanager
def _storing(what: str) -> Iterator[None]:
    """An OSError while `what` is a 503 naming its cause (read-only, full), never the path."""
    try:
        yield
    except FileNotFoundError:
        raise  # a voice removed meanwhile: the caller's 404
    except OSError as exc:
        cause = exc.strerror or exc.__class__.__name__
        raise StorageFailed(f"the models directory could not {what}: {cause}") from None


class VoiceLibrary:
    """The saved voices of one models directory, at most `max_voices` of them; each change
    committed to `volume` where the directory is one."""

    def __init__(self, models_dir: Path, max_voices: int, volume: SharedVolume | None = None):
        self.root = models_dir / "voices"
        self.max_voices = max_voices
        self._volume = volume
        # Counting and renaming into place happen under it, so concurrent creates never pass
        # the limit together. (Routers sharing a volume each keep their own count.)
        self._lock = threading.Lock()
        self._tidy()

    def _tidy(self) -> None:
        """What a process that died mid-write or mid-removal left behind."""
        for root in (self.root, self._consents):
            for entry in root.iterdir() if root.is_dir() else ():
                stale = entry.name.startswith(_INCOMING) and time.time() - entry.stat().st_mtime > _STALE_SECONDS
                if entry.name.startswith(_REMOVED) or stale:
                    shutil.rmtree(entry, ignore_errors=True)

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if _ID.match(entry.name))

    def _read(self, voice_id: str) -> Voice | None:
        try:
            data = json.loads((self.root / voice_id / DETAILS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        data["models"] = tuple(data.get("models") or ())
        return Voice(**data)

    def find(self, voice_id: str | None, caller: Caller) -> Voice | None:
        """The voice `voice_id` names, if `caller` may see it; None for any other name."""
        if not voice_id or not _ID.match(voice_id):
            return None
        voice = self._read(voice_id)
        return voice if voice is not None and voice.visible_to(caller) else None

    def get(self, voice_id: str, caller: Caller) -> Voice:
        voice = self.find(voice_id, caller)
        if voice is None:
            raise VoiceNotFound(f"A voice with the voice_id {voice_id} was not found.", param="voice_id")
        return voice

    def all(self, caller: Caller) -> list[Voice]:
        """The voices `caller` may see, oldest first."""
        voices = [v for v in map(self._read, self._ids()) if v is not None and v.visible_to(caller)]
        return sorted(voices, key=lambda v: (v.created, v.id))

    def create(self, uploads: list[Upload], details: VoiceDetails, caller: Caller,
               longest: float = MAX_UPLOAD_SECONDS, param: str = "files") -> Voice:
        """Decodes `uploads` (at most `longest` seconds, from the form field `param`) into a new
        voice and saves it; nothing is kept if anything fails. Blocking (decoding takes a while):
        call it from a worker thread."""
        details = details.check()
        if not details.name:
            raise InvalidRequest("'name' is required", param="name")
        if details.consent is not None and self.consent(details.consent, caller) is None:
            raise InvalidRequest(f"consent '{details.consent}' was not found: upload a consent recording first",
                                 param="consent")
        samples = decode_reference(uploads, longest, param)
        voice = Voice(
            id=secrets.token_hex(10), name=details.name, seconds=round(len(samples) / REFERENCE_RATE, 3),
            owner=caller.owner, description=details.description or "", labels=details.labels or {},
            language=details.language, transcript=details.transcript, models=details.models or (),
            consent=details.consent, created=int(time.time()),
        )

        def room() -> None:
            if len(self._ids()) >= self.max_voices:
                raise InvalidRequest(f"this server keeps at most {self.max_voices} voices: delete one first")

        self._place(self.root, voice.id, {REFERENCE_FILE: _wav(samples), DETAILS_FILE: json.dumps(asdict(voice)).encode()},
                    "save the voice", room)
        return voice

    def _place(self, root: Path, name: str, files: dict[str, bytes], what: str,
               check: Callable[[], None] | None = None) -> None:
        """`files` written in a hidden folder of `root`, then renamed to `root/name` at once
        (after `check`, under the lock) and committed; on any failure nothing is left, and the
        error says the library could not `what`."""
        incoming = root / f"{_INCOMING}{name}"
        try:
            with _storing(what):
                root.mkdir(parents=True, exist_ok=True)
                incoming.mkdir()
                for file, data in files.items():
                    (incoming / file).write_bytes(data)
            with self._lock:
                if check is not None:
                    check()
                with _storing(what):
                    incoming.rename(root / name)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        try:
            self._commit(what)
        except StorageFailed:
            # Not kept where other hosts would see it: not kept at all.
            shutil.rmtree(root / name, ignore_errors=True)
            raise

    def _commit(self, what: str) -> None:
        if self._volume is None:
            return
        try:
            self._volume.commit()
        except Exception as exc:  # noqa: BLE001 - the volume's client raises its own kinds
            # Its message may hold the volume's paths: the log has it, the client gets the gist.
            log.error("the models volume did not commit (to %s): %s", what, exc)
            raise StorageFailed(f"the models volume could not {what}: its commit failed, see the router's "
                                "log") from None

    # -- consents: a recording of the speaker agreeing, which OpenAI's custom voices require ---

    @property
    def _consents(self) -> Path:
        return self.root / _CONSENTS

    def add_consent(self, recording: Upload, name: str, language: str, caller: Caller) -> Consent:
        """Blocking, like `create`."""
        details = VoiceDetails(name=name, language=language).check()
        samples = decode_reference([recording], param="recording")
        consent = Consent(f"cons_{secrets.token_hex(10)}", details.name or "", language, caller.owner, int(time.time()))
        self._place(self._consents, consent.id, {_CONSENT_RECORDING: _wav(samples),
                                                 _CONSENT_META: json.dumps(asdict(consent)).encode()},
                    "save the consent")
        return consent

    def consent(self, consent_id: str, caller: Caller) -> Consent | None:
        if not _CONSENT_ID.match(consent_id):
            return None
        try:
            consent = Consent(**json.loads((self._consents / consent_id / _CONSENT_META).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None
        return consent if caller.admin or consent.owner == caller.owner else None

    def consents(self, caller: Caller) -> list[Consent]:
        names = sorted(e.name for e in self._consents.iterdir()) if self._consents.is_dir() else []
        found = [c for c in (self.consent(name, caller) for name in names) if c is not None]
        return sorted(found, key=lambda c: (c.created, c.id))

    def delete_consent(self, consent_id: str, caller: Caller) -> None:
        if self.consent(consent_id, caller) is None:
            raise NotFound(f"consent '{consent_id}' was not found", param="consent_id")
        self._remove(self._consents, consent_id)

    def edit(self, voice_id: str, details: VoiceDetails, caller: Caller) -> Voice:
        voice = self.get(voice_id, caller)
        changes = {k: v for k, v in asdict(details.check()).items() if v is not None}
        edited = replace(voice, **changes)
        folder = self.root / voice_id
        temporary = folder / f".{DETAILS_FILE}.{secrets.token_hex(4)}"
        try:
            with _storing("save the voice"):
                temporary.write_text(json.dumps(asdict(edited)), encoding="utf-8")
                temporary.replace(folder / DETAILS_FILE)  # atomic: a reader sees the old or the new
        except FileNotFoundError:
            raise VoiceNotFound(f"A voice with the voice_id {voice_id} was not found.", param="voice_id") from None
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()
        self._commit("save the voice")
        return edited

    def delete(self, voice_id: str, caller: Caller) -> None:
        """Removes the voice and everything kept beside it (a backend's conditioning included)."""
        self.get(voice_id, caller)
        self._remove(self.root, voice_id)

    def _remove(self, root: Path, name: str) -> None:
        removed = root / f"{_REMOVED}{name}-{secrets.token_hex(4)}"
        try:
            with _storing("remove it"):
                (root / name).rename(removed)  # gone for every reader at once
        except FileNotFoundError:
            raise NotFound(f"'{name}' was not found (removed meanwhile)") from None
        shutil.rmtree(removed, ignore_errors=True)
        self._commit("remove it")

    def usable(self, voice: Voice | None, configs: list[ModelConfig]) -> list[str]:
        """The models among `configs` that can speak `voice` (any saved voice, for None)."""
        allowed = voice.models if voice is not None else ()
        return [c.name for c in configs if clones_voices(c) and (not allowed or c.name in allowed)]
