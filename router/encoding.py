"""In-process streaming audio encoders built on PyAV (bundled FFmpeg).

The synthesis engines hand us signed 16-bit little-endian mono PCM chunk by
chunk; a :class:`StreamEncoder` turns each chunk into whatever encoded bytes
are ready right away, so an HTTP response can stream them without waiting for
the end of the utterance. Everything stays in memory: no temp files, no
``ffmpeg`` subprocess.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache

import av
import numpy as np
from av.audio.fifo import AudioFifo
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler

from functions.streams import Stream, primed


@dataclass
class EncodedAudio:
    """Encoded audio on its way out, its first bytes already made: any error a request can cause
    has surfaced (as a proper HTTP error) before the response status is sent. Whoever holds it
    closes `rest`, read or not: that stops the synthesis behind it."""

    media_type: str
    sample_rate: int
    first: bytes
    rest: Stream[bytes]
    #: Response headers that come with it (X-Chorus-Cache).
    headers: dict[str, str] = field(default_factory=dict)

    def __aiter__(self) -> Stream[bytes]:
        return primed(self.first, self.rest)

    async def aclose(self) -> None:
        await self.rest.aclose()


@dataclass(frozen=True)
class _CodecSpec:
    encoder: str  # FFmpeg encoder name
    muxer: str  # FFmpeg muxer name
    media_type: str
    extension: str
    default_bit_rate: int | None = None  # only lossy codecs take a bit rate


_CODECS: dict[str, _CodecSpec] = {
    # wav is s16le with a hand-written header: FFmpeg's wav muxer would try to
    # seek back to patch the sizes, which a stream cannot do.
    "wav": _CodecSpec("pcm_s16le", "s16le", "audio/wav", "wav"),
    "pcm": _CodecSpec("pcm_s16le", "s16le", "audio/pcm", "pcm"),
    "ulaw": _CodecSpec("pcm_mulaw", "mulaw", "audio/basic", "ulaw"),
    "alaw": _CodecSpec("pcm_alaw", "alaw", "audio/x-alaw-basic", "alaw"),
    # Mono speech: 64 kb/s is transparent enough and valid for every lame rate.
    "mp3": _CodecSpec("libmp3lame", "mp3", "audio/mpeg", "mp3", 64_000),
    "aac": _CodecSpec("aac", "adts", "audio/aac", "aac", 64_000),
    "flac": _CodecSpec("flac", "flac", "audio/flac", "flac"),
    # libopus explicitly: FFmpeg's native "opus" encoder is experimental.
    "opus": _CodecSpec("libopus", "ogg", "audio/ogg", "ogg", 32_000),
}

#: Every codec's name, as clients and the CLI spell it.
CODEC_NAMES = tuple(sorted(_CODECS))
# A file name's extension -> its codec (.opus is Opus in Ogg too).
_BY_EXTENSION = {f".{spec.extension}": codec for codec, spec in _CODECS.items()} | {".opus": "opus"}


def codec_for_extension(suffix: str) -> str | None:
    """The codec a file extension such as ".mp3" asks for; None for one no codec writes."""
    return _BY_EXTENSION.get(suffix.lower())


# Encoder options. compression_level maps to lame's -q: 7 trades a little
# psychoacoustic effort (inaudible on speech) for ~20% more speed.
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libmp3lame": {"compression_level": "7"},
}

# Muxer options. The ogg muxer holds packets until a page spans page_duration
# (1 s by default); 100 ms pages keep streaming latency low for ~7% overhead
# at 32 kb/s. The flac muxer reserves 8 KiB of PADDING for later metadata
# edits by default, which a stream will never make.
_MUXER_OPTIONS: dict[str, dict[str, str]] = {
    "ogg": {"page_duration": "100000"},
    "flac": {"metadata_header_padding": "0"},
}


@cache
def _accepted_rates(codec: str) -> tuple[int, ...] | None:
    """Sample rates the encoder accepts, or None when it takes any rate."""
    rates = av.Codec(_CODECS[codec].encoder, "w").audio_rates
    return tuple(rates) if rates else None


def _check_codec(codec: str) -> _CodecSpec:
    try:
        return _CODECS[codec]
    except KeyError:
        known = ", ".join(sorted(_CODECS))
        raise ValueError(f"unknown audio codec {codec!r}; expected one of: {known}") from None


@dataclass(frozen=True)
class AudioFormat:
    """What the client asked for. Validated on construction."""

    codec: str  # one of the keys of _CODECS
    sample_rate: int | None = None  # None: source rate snapped to one the codec takes
    bit_rate: int | None = None  # bits/s for lossy codecs; None: codec default

    def __post_init__(self) -> None:
        _check_codec(self.codec)
        if self.sample_rate is not None:
            if self.sample_rate <= 0:
                raise ValueError(f"sample rate must be positive, got {self.sample_rate}")
            rates = _accepted_rates(self.codec)
            if rates is not None and self.sample_rate not in rates:
                allowed = ", ".join(str(r) for r in sorted(rates))
                raise ValueError(
                    f"{self.codec} cannot encode at {self.sample_rate} Hz; "
                    f"supported rates: {allowed}"
                )
        if self.bit_rate is not None and self.bit_rate <= 0:
            raise ValueError(f"bit rate must be positive, got {self.bit_rate}")

    @property
    def media_type(self) -> str:
        return _CODECS[self.codec].media_type

    @property
    def extension(self) -> str:
        return _CODECS[self.codec].extension

    def output_rate_for(self, input_rate: int) -> int:
        """The rate the encoder will produce when fed ``input_rate`` PCM."""
        if self.sample_rate is not None:
            return self.sample_rate
        rates = _accepted_rates(self.codec)
        if rates is None:
            return input_rate
        # Ties go to the higher rate so we never lose bandwidth needlessly.
        return min(rates, key=lambda r: (abs(r - input_rate), -r))


def _wav_header(rate: int) -> bytes:
    """RIFF/WAVE header for 16-bit mono PCM of unknown length.

    Both size fields are 0xFFFFFFFF, the usual convention for streamed WAV
    (decoders then read the data chunk until EOF).
    """
    unknown = 0xFFFFFFFF
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", unknown, b"WAVE",
        b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
        b"data", unknown,
    )  # fmt: skip


class _ByteSink:
    """Write-only, non-seekable file object the muxer writes into.

    Declaring it non-seekable makes FFmpeg muxers stream-friendly (no seeking
    back to patch headers); drain() hands over what was written so far.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class StreamEncoder:
    """Encode s16le mono PCM at ``input_rate`` into ``fmt``, chunk by chunk.

    Call encode() for every PCM chunk and finish() exactly once at the end;
    concatenating all returned bytes gives the complete file/stream.
    """

    def __init__(self, fmt: AudioFormat, input_rate: int) -> None:
        if input_rate <= 0:
            raise ValueError(f"input rate must be positive, got {input_rate}")
        spec = _check_codec(fmt.codec)
        self._input_rate = input_rate
        self._output_rate = fmt.output_rate_for(input_rate)

        self._resampler: AudioResampler | None = None
        if self._output_rate != input_rate:
            # One resampler for the whole stream keeps the filter state across
            # chunks, so chunk borders produce no clicks or gaps.
            self._resampler = AudioResampler(format="s16", layout="mono", rate=self._output_rate)

        self._sink = _ByteSink()
        self._container = av.open(
            self._sink,
            mode="w",
            format=spec.muxer,
            # Flush the I/O buffer after every packet so no bytes wait in the
            # 32 KiB AVIO buffer. FFmpeg's "auto" default already does this
            # for non-seekable outputs; being explicit keeps streaming from
            # hinging on that heuristic.
            container_options={"flush_packets": "1", **_MUXER_OPTIONS.get(spec.muxer, {})},
        )
        self._stream = self._container.add_stream(
            spec.encoder,
            rate=self._output_rate,
            options=_ENCODER_OPTIONS.get(spec.encoder, {}),
        )
        ctx = self._stream.codec_context
        ctx.layout = "mono"
        formats = {f.name for f in ctx.codec.audio_formats or ()}
        # Prefer 16-bit (planar and packed are the same bytes for mono) so our
        # s16 input reaches the encoder without a float round trip.
        ctx.format = next((f for f in ("s16", "s16p") if f in formats), ctx.format.name)
        ctx.time_base = Fraction(1, self._output_rate)
        if spec.default_bit_rate is not None:  # lossless codecs ignore bit_rate
            ctx.bit_rate = fmt.bit_rate or spec.default_bit_rate
        # Opening now (not lazily at the first packet) gives us frame_size and
        # surfaces bad settings, such as a bit rate lame rejects, right here.
        ctx.open()

        # Encoders with a fixed frame size (aac 1024, opus 20 ms, lame, flac)
        # get exactly that many samples per frame; PCM codecs take any size.
        self._frame_size: int = ctx.frame_size
        self._fifo = AudioFifo() if self._frame_size else None
        self._pts = 0  # samples sent to the encoder so far, in 1/output_rate units
        self._odd_byte = b""  # half a sample left over from an odd-length chunk
        self._header = _wav_header(self._output_rate) if fmt.codec == "wav" else b""
        self._finished = False

    @property
    def output_rate(self) -> int:
        return self._output_rate

    def encode(self, pcm: bytes) -> bytes:
        """Feed a PCM chunk; return the encoded bytes that are ready now."""
        if self._finished:
            raise RuntimeError("encode() called after finish()")
        data = self._odd_byte + pcm
        usable = len(data) & ~1
        self._odd_byte = data[usable:]
        if usable:
            samples = np.frombuffer(data, dtype="<i2", count=usable // 2)
            frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self._input_rate
            for out in self._resampler.resample(frame) if self._resampler else (frame,):
                self._push(out)
        return self._drain()

    def finish(self) -> bytes:
        """Flush resampler, encoder and muxer; return the remaining bytes."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        # A dangling half sample (odd total input length) cannot be encoded
        # and is dropped.
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                self._push(out)
        if self._fifo is not None and self._fifo.samples:
            # The short last frame goes to the encoder as is: FFmpeg pads it
            # with silence internally but still knows the real sample count,
            # so containers that can trim (Ogg granule positions) stay exact.
            self._send(self._fifo.read())
        self._container.mux(self._stream.encode(None))
        self._container.close()  # writes the trailer
        return self._drain()

    def _push(self, frame: AudioFrame) -> None:
        if self._fifo is None:
            self._send(frame)
            return
        frame.pts = None  # the FIFO checks pts continuity; we re-stamp in _send
        self._fifo.write(frame)
        for chunk in self._fifo.read_many(self._frame_size):
            self._send(chunk)

    def _send(self, frame: AudioFrame) -> None:
        frame.pts = self._pts
        frame.time_base = self._stream.codec_context.time_base
        self._pts += frame.samples
        self._container.mux(self._stream.encode(frame))

    def _drain(self) -> bytes:
        header, self._header = self._header, b""
        return header + self._sink.drain()


def encode_all(fmt: AudioFormat, input_rate: int, chunks: Iterable[bytes]) -> bytes:
    """Encode a whole PCM stream at once (non-streaming convenience)."""
    encoder = StreamEncoder(fmt, input_rate)
    parts = [encoder.encode(chunk) for chunk in chunks]
    parts.append(encoder.finish())
    return b"".join(parts)
