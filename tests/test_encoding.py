"""Round-trip tests for router.encoding: encode a sine, decode it with PyAV."""

from __future__ import annotations

import io
import itertools
import struct
import sys
from pathlib import Path

import av
import numpy as np
import pytest

# Make the repo root importable when pytest is run without a project config.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.encoding import AudioFormat, StreamEncoder, encode_all  # noqa: E402

RATE = 22050
TONE_HZ = 440.0
SECONDS = 2.0
# Cut points in bytes: 7 uneven chunks, several of odd length so half samples
# straddle chunk borders.
CUTS = (1, 4411, 10_000, 30_001, 52_000, 70_003)

# Decoder name(s) PyAV reports for each codec's output.
DECODERS = {
    "wav": {"pcm_s16le"},
    "pcm": {"pcm_s16le"},
    "ulaw": {"pcm_mulaw"},
    "alaw": {"pcm_alaw"},
    "mp3": {"mp3", "mp3float"},
    "aac": {"aac"},
    "flac": {"flac"},
    "opus": {"opus", "libopus"},
}
LOSSY = {"mp3", "aac", "opus"}
# Headerless outputs need the demuxer named and told the rate.
RAW_DEMUXERS = {"pcm": "s16le", "ulaw": "mulaw", "alaw": "alaw"}
# Demuxer names where probing a short in-memory stream is not reliable.
DEMUXERS = {"aac": "aac", **RAW_DEMUXERS}


def sine(seconds: float = SECONDS, rate: int = RATE) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    return (np.sin(2 * np.pi * TONE_HZ * t) * 12_000).astype("<i2").tobytes()


def split(data: bytes, cuts: tuple[int, ...] = CUTS) -> list[bytes]:
    bounds = (0, *cuts, len(data))
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def decode(data: bytes, codec: str, rate: int) -> tuple[str, int, np.ndarray]:
    """Decode ``data``; return (decoder name, decoded rate, mono float samples)."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if codec in RAW_DEMUXERS else {}
    with av.open(io.BytesIO(data), format=DEMUXERS.get(codec), options=options) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().astype(np.float64) for f in container.decode(stream)]
        name = stream.codec_context.name
        decoded_rate = stream.codec_context.sample_rate
    assert frames, f"{codec}: nothing decoded"
    # Packed formats give shape (1, n*channels), planar ones (channels, n): we
    # encode mono, so taking row 0 is the signal either way.
    samples = np.concatenate([f[0] for f in frames])
    return name, decoded_rate, samples


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def opus_head_rate(data: bytes) -> int:
    """Input sample rate recorded in the OpusHead packet (RFC 7845, offset 12)."""
    at = data.index(b"OpusHead")
    return struct.unpack_from("<I", data, at + 12)[0]


def check_roundtrip(codec: str, data: bytes, rate: int) -> None:
    name, decoded_rate, samples = decode(data, codec, rate)
    assert name in DECODERS[codec]
    if codec == "opus":
        # Opus always decodes at 48 kHz; the encoding rate lives in OpusHead.
        assert decoded_rate == 48_000
        assert opus_head_rate(data) == rate
    else:
        assert decoded_rate == rate
    duration = len(samples) / decoded_rate
    if codec in LOSSY:
        # Encoder priming and last-frame padding may add a little, never cut.
        assert SECONDS - 0.01 <= duration <= SECONDS + 0.1, duration
    else:
        assert duration == pytest.approx(SECONDS, abs=2 / rate), duration
    # One FFT bin is 0.5 Hz over 2 s; allow a few.
    assert dominant_hz(samples, decoded_rate) == pytest.approx(TONE_HZ, abs=2.0)


@pytest.mark.parametrize("codec", sorted(DECODERS))
def test_roundtrip_at_source_rate(codec: str) -> None:
    encoder = StreamEncoder(AudioFormat(codec), RATE)
    # Every codec takes 22050 Hz except Opus, which snaps to 24 kHz.
    expected_rate = 24_000 if codec == "opus" else RATE
    assert encoder.output_rate == expected_rate
    data = b"".join(encoder.encode(chunk) for chunk in split(sine())) + encoder.finish()
    check_roundtrip(codec, data, expected_rate)


@pytest.mark.parametrize(
    ("codec", "rate"),
    [
        ("wav", 16_000),
        ("pcm", 24_000),
        ("ulaw", 8_000),
        ("alaw", 8_000),
        ("mp3", 16_000),
        ("aac", 24_000),
        ("flac", 48_000),
        ("opus", 48_000),
    ],
)
def test_roundtrip_resampled(codec: str, rate: int) -> None:
    data = encode_all(AudioFormat(codec, sample_rate=rate), RATE, split(sine()))
    check_roundtrip(codec, data, rate)


def test_pcm_resample_length_and_continuity() -> None:
    data = encode_all(AudioFormat("pcm", sample_rate=24_000), RATE, split(sine()))
    assert abs(len(data) - 24_000 * 2 * 2) <= 2 * 16  # a few samples of filter slack
    samples = np.frombuffer(data, dtype="<i2").astype(np.int64)
    # A gap or restart at a chunk border shows up as a jump far above the
    # sine's steepest step (2*pi*440/24000 * 12000 ~ 1380 per sample).
    assert np.abs(np.diff(samples[100:-100])).max() < 1_600


def test_wav_header() -> None:
    pcm = sine()
    data = encode_all(AudioFormat("wav"), RATE, split(pcm))
    fields = struct.unpack_from("<4sI4s4sIHHIIHH4sI", data)
    assert fields == (
        b"RIFF", 0xFFFFFFFF, b"WAVE",
        b"fmt ", 16, 1, 1, RATE, RATE * 2, 2, 16,
        b"data", 0xFFFFFFFF,
    )  # fmt: skip
    assert data[44:] == pcm  # no resampling: samples pass through untouched


def test_wav_header_uses_output_rate() -> None:
    data = encode_all(AudioFormat("wav", sample_rate=8_000), RATE, [sine()])
    assert struct.unpack_from("<I", data, 24)[0] == 8_000


@pytest.mark.parametrize("codec", ["mp3", "opus", "aac", "wav", "pcm"])
def test_bytes_stream_before_finish(codec: str) -> None:
    encoder = StreamEncoder(AudioFormat(codec), RATE)
    half_second = RATE  # bytes: 0.5 s of s16 mono
    pcm = sine(4.0)
    early = [encoder.encode(pcm[i : i + half_second]) for i in range(0, len(pcm), half_second)]
    tail = encoder.finish()
    assert early[0], "nothing came out of the first 0.5 s chunk"
    # Most of the stream must leave during encode(), not pile up for finish().
    assert sum(map(len, early)) > 4 * len(tail)


def test_opus_is_opus_not_vorbis() -> None:
    data = encode_all(AudioFormat("opus"), RATE, split(sine()))
    assert data.startswith(b"OggS")
    assert b"OpusHead" in data and b"OpusTags" in data
    assert b"\x01vorbis" not in data
    assert decode(data, "opus", 24_000)[0] in DECODERS["opus"]


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown audio codec"):
        AudioFormat("vorbis")


@pytest.mark.parametrize(("codec", "rate"), [("opus", 44_100), ("mp3", 96_000), ("aac", 5_000)])
def test_rate_codec_cannot_take(codec: str, rate: int) -> None:
    with pytest.raises(ValueError, match=str(rate)):
        AudioFormat(codec, sample_rate=rate)


@pytest.mark.parametrize("kwargs", [{"sample_rate": 0}, {"bit_rate": -1}])
def test_non_positive_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        AudioFormat("mp3", **kwargs)


def test_non_positive_input_rate() -> None:
    with pytest.raises(ValueError):
        StreamEncoder(AudioFormat("pcm"), 0)


def test_rate_snapping() -> None:
    assert StreamEncoder(AudioFormat("opus"), 22_050).output_rate == 24_000
    assert StreamEncoder(AudioFormat("opus"), 44_100).output_rate == 48_000
    assert StreamEncoder(AudioFormat("mp3"), 22_050).output_rate == 22_050
    assert StreamEncoder(AudioFormat("flac"), 22_050).output_rate == 22_050


def test_media_type_and_extension() -> None:
    expected = {
        "wav": ("audio/wav", "wav"),
        "mp3": ("audio/mpeg", "mp3"),
        "aac": ("audio/aac", "aac"),
        "flac": ("audio/flac", "flac"),
        "opus": ("audio/ogg", "ogg"),
        "pcm": ("audio/pcm", "pcm"),
        "ulaw": ("audio/basic", "ulaw"),
        "alaw": ("audio/x-alaw-basic", "alaw"),
    }
    for codec, (media_type, extension) in expected.items():
        fmt = AudioFormat(codec)
        assert (fmt.media_type, fmt.extension) == (media_type, extension)


def test_no_encode_after_finish() -> None:
    encoder = StreamEncoder(AudioFormat("pcm"), RATE)
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.encode(b"\x00\x00")
