"""An on-disk cache of complete synthesis responses, so an identical request costs no backend time.

The key covers everything that changes the bytes sent: the model's config (backend, weights
file and its size and modification time, parameters, voice settings), the request after overrides
(text, voice, language, speed, seed, instructions, sound settings) and the output format. Only a
response that streamed to its end without error is stored: it is written to a temporary file as it
goes out and renamed into place at the end (atomic: a reader never sees half a file), and dropped
when the stream fails or every client has left. An identical request that arrives while a response
is being made follows that one (X-Chorus-Cache: shared) rather than paying for a second synthesis.
The size is capped; the least recently used entries go first. A cache that cannot write (a full
or vanished disk) costs the entry, never the client's audio. Backends that sample (Bark,
MusicGen) return the cached recording of a request that names no seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from anyio import to_thread

from functions.config import ModelConfig, UnsafePathError, resolve_in
from functions.protocol import SynthesisRequest
from functions.streams import Stream, released_by
from router.encoding import AudioFormat, EncodedAudio

log = logging.getLogger("chorus")

_VERSION = 1  # bump when the stored layout or the encoders' output changes
_SUFFIX = ".audio"
_HEADER = struct.Struct(">I")  # length of the JSON metadata that precedes the audio
_READ_PIECE = 64 * 1024


class SynthesisCache:
    def __init__(self, directory: Path, max_bytes: int, models_dir: Path):
        self.directory = directory
        self.max_bytes = max_bytes
        self.models_dir = models_dir
        self._partial = directory / "partial"
        self._partial.mkdir(parents=True, exist_ok=True)
        #: responses being made now, by key: an identical request follows one of these
        self._recordings: dict[str, Recording] = {}
        #: requests that will make a recording, until their first bytes (or their error) are known
        self._first_bytes_pending: dict[str, asyncio.Future[None]] = {}
        # Leftovers of a crash: never complete, never served. Recent ones may belong to
        # another router sharing the directory.
        for stale in self._partial.iterdir():
            if stale.stat().st_mtime < time.time() - 3600:
                stale.unlink(missing_ok=True)
        #: key -> (size, last use); rebuilt from the files so the cap holds across restarts.
        self._entries: dict[str, tuple[int, float]] = {}
        for path in directory.glob(f"*{_SUFFIX}"):
            stat = path.stat()
            self._entries[path.stem] = (stat.st_size, stat.st_mtime)
        self.size = sum(size for size, _ in self._entries.values())
        self._evict()

    def key(self, config: ModelConfig, request: SynthesisRequest, fmt: AudioFormat) -> str:
        material = {
            "version": _VERSION,
            # deploy and aliases: where it runs and what it is called, never what it sounds like
            "config": config.model_dump(mode="json", exclude={"deploy", "aliases"}),
            "weights": self._weights_stamp(config),
            "request": request.model_dump(mode="json"),
            "format": [fmt.codec, fmt.sample_rate, fmt.bit_rate],
        }
        encoded = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()

    def _weights_stamp(self, config: ModelConfig) -> list[int] | None:
        """New weights under the same file name must not be answered with the old voice."""
        if not config.parameters.model:
            return None
        try:
            stat = resolve_in(self.models_dir, config.parameters.model).stat()
        except (UnsafePathError, OSError):
            return None  # a model id, or weights that live with a remote backend
        return [stat.st_size, stat.st_mtime_ns]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{_SUFFIX}"

    async def get(self, key: str) -> EncodedAudio | None:
        """The entry for `key`, if any: its first piece read, the rest read as it is sent (a
        long entry is never all in memory)."""
        if key not in self._entries:
            return None
        try:
            file, media_type, sample_rate, start = await to_thread.run_sync(_open_entry, self._path(key))
        except (OSError, ValueError, KeyError, struct.error) as exc:
            log.warning("dropping unreadable cache entry %s: %s", key, exc)
            self._drop(key)
            return None
        size, _ = self._entries[key]
        self._entries[key] = (size, time.time())
        rest = _entry_pieces(file, start)
        first = await anext(rest, b"")
        return EncodedAudio(media_type, sample_rate, first, rest)

    async def serve(self, key: str, make: Callable[[], Awaitable[EncodedAudio]]) -> tuple[str, EncodedAudio]:
        """The response for `key` and how it came: from disk ("hit"); following an identical
        response that is being made right now, from its first byte, at no backend cost
        ("shared"); or made by `make` and recorded as it is sent ("miss"). A cache whose disk
        fails still serves what `make` made, unrecorded."""
        hit = await self.get(key)
        if hit is not None:
            return "hit", hit
        recording = await self._follow(key)
        if recording is not None:
            first = recording.first()
            return "shared", EncodedAudio(recording.media_type, recording.sample_rate, first,
                                         recording.reader(len(first)))
        with self._making(key):
            made = await make()
        try:
            recording = self.record(key, made)
        except OSError as exc:
            log.warning("the synthesis cache cannot record a response: %s", exc)
            return "miss", made
        return "miss", EncodedAudio(made.media_type, made.sample_rate, made.first, recording.reader(len(made.first)))

    def record(self, key: str, audio: EncodedAudio) -> Recording:
        """Start recording `audio`, the response for `key`."""
        recording = self._recordings[key] = Recording(key, audio, self._partial, self.max_bytes, self._recorded)
        return recording

    def _recorded(self, recording: Recording, complete: Path | None) -> None:
        if self._recordings.get(recording.key) is recording:
            del self._recordings[recording.key]
        if complete is not None:
            self._publish(recording.key, complete)

    async def _follow(self, key: str) -> Recording | None:
        """The response for `key` being made now, if an identical request may follow it. One
        still starting is waited for, and an error it meets is raised here too: an identical
        request would meet it as well. One that was abandoned while starting leaves the way
        open to the next request."""
        while (pending := self._first_bytes_pending.get(key)) is not None:
            await asyncio.shield(pending)
        recording = self._recordings.get(key)
        return recording if recording is not None and recording.joinable() else None

    @contextlib.contextmanager
    def _making(self, key: str) -> Iterator[None]:
        """Around the making of `key`'s first bytes, which `record()` then records: identical
        requests arriving meanwhile wait in `_follow()` instead of starting a synthesis."""
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first_bytes_pending[key] = started
        try:
            yield
        except Exception as exc:
            started.set_exception(exc)
            started.exception()  # retrieved: nobody may have been waiting
            raise
        finally:
            if self._first_bytes_pending.get(key) is started:
                del self._first_bytes_pending[key]
            if not started.done():
                started.set_result(None)

    def _publish(self, key: str, partial: Path) -> None:
        target = self._path(key)
        os.replace(partial, target)
        if key in self._entries:
            self.size -= self._entries[key][0]
        size = target.stat().st_size
        self._entries[key] = (size, time.time())
        self.size += size
        self._evict()

    def _evict(self) -> None:
        if self.size <= self.max_bytes:
            return
        for key, _ in sorted(self._entries.items(), key=lambda item: item[1][1]):
            self._drop(key)
            if self.size <= self.max_bytes:
                break

    def _drop(self, key: str) -> None:
        size, _ = self._entries.pop(key, (0, 0.0))
        self.size -= size
        self._path(key).unlink(missing_ok=True)


def _open_entry(path: Path) -> tuple[BinaryIO, str, int, int]:
    """An entry's open file, media type, sample rate, and where its audio starts."""
    file = path.open("rb")
    try:
        (length,) = _HEADER.unpack(file.read(_HEADER.size))
        meta = json.loads(file.read(length))
        return file, meta["media_type"], int(meta["sample_rate"]), _HEADER.size + length
    except BaseException:
        file.close()
        raise


def _entry_pieces(file: BinaryIO, offset: int) -> Stream[bytes]:
    """A stored entry's audio from `offset` on, in pieces, by offset like a Recording's readers
    (the file stays readable if it is evicted meanwhile); the file is closed with the stream."""

    async def pieces() -> AsyncIterator[bytes]:
        position = offset
        while piece := os.pread(file.fileno(), _READ_PIECE, position):
            position += len(piece)
            yield piece

    async def close() -> None:
        file.close()

    return released_by(pieces(), close)


class Recording:
    """A response on its way out, written to a partial file as it goes, and shared: an identical
    request that arrives meanwhile follows it (reading what is written, then waiting for more)
    instead of being synthesised again. The entry is published when the source ends, and
    dropped on error or when every reader has left.

    Whichever reader reaches the end of what is written asks the source for the next piece, as
    a task of its own: a reader that leaves mid-wait does not break the source for the others,
    and only when the last one leaves is the source closed (which stops the backend). Readers
    read the file by offset through the one descriptor, which stays valid after the file is
    renamed into the cache or evicted.
    """

    def __init__(
        self,
        key: str,
        audio: EncodedAudio,
        partial_dir: Path,
        max_bytes: int,
        done: Callable[[Recording, Path | None], None],
    ):
        """`audio` recorded into a file of `partial_dir`; at most `max_bytes` of it are kept for
        the cache. `done` is told once the recording is over, with its complete file (to keep)
        or None."""
        self.key = key
        self.media_type = audio.media_type
        self.sample_rate = audio.sample_rate
        self._source = audio.rest
        self._max_bytes = max_bytes
        self._done = done
        self._partial = partial_dir / f"{key}.{uuid.uuid4().hex}"
        meta = json.dumps({"media_type": audio.media_type, "sample_rate": audio.sample_rate}).encode()
        first = audio.first
        # Made again if a cleaner emptied the cache's directory since start-up.
        partial_dir.mkdir(parents=True, exist_ok=True)
        self._file = self._partial.open("w+b")
        try:
            self._file.write(_HEADER.pack(len(meta)) + meta + first)
            self._file.flush()
        except OSError:
            self._file.close()
            self._partial.unlink(missing_ok=True)
            raise
        self._start = _HEADER.size + len(meta)
        #: audio bytes made so far; those in the file, unless `_whole` is False
        self._size = len(first)
        #: every byte made is in the file (false once a recording nobody followed passes the size
        #: cap: its one reader is always at the head, so it needs no file)
        self._whole = True
        #: followed at some point: from then on every byte is written, since a reader may lag
        self._shared = False
        self._ended = False
        self._error: BaseException | None = None
        self._next: asyncio.Task[bytes | None] | None = None
        self._readers = 0

    def joinable(self) -> bool:
        return self._whole and self._error is None

    def reader(self, offset: int) -> Stream[bytes]:
        """The response's audio from `offset` on; the caller must close it (that counts even
        if it was never read)."""
        self._readers += 1
        self._shared = self._shared or self._readers > 1

        async def pieces() -> AsyncIterator[bytes]:
            position = offset
            while (piece := await self._piece_after(position)) is not None:
                position += len(piece)
                yield piece

        return released_by(pieces(), self._leave)

    def first(self) -> bytes:
        return self._read(0)

    def _read(self, offset: int) -> bytes:
        return os.pread(self._file.fileno(), min(_READ_PIECE, self._size - offset), self._start + offset)

    async def _piece_after(self, offset: int) -> bytes | None:
        """The bytes after `offset`, waiting for the source if need be; None at the end."""
        while True:
            if offset < self._size:
                return self._read(offset)
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            if self._next is None:
                self._next = asyncio.ensure_future(self._pull())
            piece = await asyncio.shield(self._next)
            if piece is not None and not self._whole:
                return piece  # not in the file: the lone reader past the size cap takes it here

    async def _pull(self) -> bytes | None:
        """The source's next piece, written to the file; None at its end or on its failure
        (kept in `_error` for every reader, so the task itself never ends in an error)."""
        try:
            piece = await anext(self._source)
        except StopAsyncIteration:
            self._ended = True
            self._finish()
            return None
        except Exception as exc:
            self._error = exc
            self._finish()
            return None
        finally:
            self._next = None
        if self._whole and (self._size + len(piece) <= self._max_bytes or self._shared):
            try:
                self._file.write(piece)
                self._file.flush()
            except OSError as exc:
                if self._shared:
                    # A follower may lag behind, reading bytes only the file would have held.
                    self._error = exc
                    self._finish()
                    return None
                # A full disk costs the cache this entry, not the client its audio.
                log.warning("the synthesis cache stops recording a response: %s", exc)
                self._whole = False
        else:
            # Too big to keep and never followed: stop writing, and let nobody join from here.
            self._whole = False
        self._size += len(piece)
        return piece

    def _finish(self) -> None:
        """Hand a complete recording that fits the cache to it; drop anything else."""
        complete = self._ended and self._whole and self._size <= self._max_bytes and self._partial.exists()
        if not complete:
            self._partial.unlink(missing_ok=True)
        self._done(self, self._partial if complete else None)

    async def _leave(self) -> None:
        self._readers -= 1
        if self._readers:
            return
        if not self._ended and self._error is None:
            # The last reader left before the end: nothing more is wanted from the backend.
            self._error = _Abandoned("every reader of this response left")
            self._finish()
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._next
        # Also after a failure of the recording's own (its file), which leaves the source mid-way;
        # a source that ended or raised is closed already, and this does nothing.
        await self._source.aclose()
        self._file.close()


class _Abandoned(Exception):
    """Every reader of a recording left before its end."""
