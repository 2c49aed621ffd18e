"""An on-disk cache of complete synthesis responses, so an identical request costs no backend time.

The key covers everything that changes the bytes sent: the model's config (backend, weights
file and its size and modification time, parameters, voice settings), the request after overrides
(text, voice, language, speed, seed, instructions, sound settings) and the output format. Only a
response that streamed to its end without error is stored: it is written to a temporary file as it
goes out and renamed into place at the end (atomic: a reader never sees half a file), and dropped
when the stream fails or the client leaves. The size is capped; the least recently used entries
go first. Note that backends which sample (Bark, MusicGen) return the cached take of a request
that names no seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from functions.config import ModelConfig, UnsafePathError, resolve_in
from functions.protocol import SynthesisRequest
from router.encoding import AudioFormat

log = logging.getLogger("chorus")

_VERSION = 1  # bump when the stored layout or the encoders' output changes
_SUFFIX = ".audio"
_HEADER = struct.Struct(">I")  # length of the JSON metadata that precedes the audio
_READ_PIECE = 64 * 1024


@dataclass
class CachedAudio:
    media_type: str
    sample_rate: int
    data: bytes


class SynthesisCache:
    def __init__(self, directory: Path, max_bytes: int, models_dir: Path):
        self.directory = directory
        self.max_bytes = max_bytes
        self.models_dir = models_dir
        self._partial = directory / "partial"
        self._partial.mkdir(parents=True, exist_ok=True)
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
            # deploy: only where and how it runs, never what it sounds like
            "config": config.model_dump(mode="json", exclude={"deploy"}),
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

    async def get(self, key: str) -> CachedAudio | None:
        if key not in self._entries:
            return None
        try:
            raw = await to_thread.run_sync(self._path(key).read_bytes)
            (length,) = _HEADER.unpack_from(raw)
            meta = json.loads(raw[_HEADER.size : _HEADER.size + length])
            data = raw[_HEADER.size + length :]
            cached = CachedAudio(meta["media_type"], int(meta["sample_rate"]), data)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            log.warning("dropping unreadable cache entry %s: %s", key, exc)
            self._drop(key)
            return None
        size, _ = self._entries[key]
        self._entries[key] = (size, time.time())
        return cached

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

    @staticmethod
    def pieces(data: bytes) -> list[bytes]:
        return [data[i : i + _READ_PIECE] for i in range(0, len(data), _READ_PIECE)] or [b""]


class Recording:
    """Passes a response's pieces on while writing them to the cache; the entry is published
    only when the stream reaches its end, and dropped on error or close. Class-based (not a
    generator) so that closing it closes its source even if it was never iterated."""

    def __init__(
        self,
        cache: SynthesisCache,
        key: str,
        media_type: str,
        sample_rate: int,
        first: bytes,
        source: AsyncIterator[bytes],
    ):
        self._cache = cache
        self._key = key
        self._source = source
        self._partial = cache._partial / f"{key}.{uuid.uuid4().hex}"
        meta = json.dumps({"media_type": media_type, "sample_rate": sample_rate}).encode()
        self._file = self._partial.open("wb")
        self._file.write(_HEADER.pack(len(meta)) + meta + first)
        self._size = len(first)

    def __aiter__(self) -> Recording:
        return self

    async def __anext__(self) -> bytes:
        try:
            piece = await anext(self._source)
        except StopAsyncIteration:
            self._finish(complete=True)
            raise
        except BaseException:
            self._finish(complete=False)
            raise
        self._size += len(piece)
        if self._size <= self._cache.max_bytes:
            self._file.write(piece)
        return piece

    def _finish(self, complete: bool) -> None:
        if self._file.closed:
            return
        self._file.close()
        if complete and self._size <= self._cache.max_bytes:
            self._cache._publish(self._key, self._partial)
        else:
            self._partial.unlink(missing_ok=True)

    async def aclose(self) -> None:
        self._finish(complete=False)
        await self._source.aclose()  # type: ignore[attr-defined]
