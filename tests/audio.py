"""What the tests know about audio: the texts they speak and how long that takes with the bundled
voice, decoding any response's audio with PyAV (and the events of an SSE response), and a
voice-like recording to clone from."""

from __future__ import annotations

import io
import json
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

#: About 2.4 s of speech with the bundled voice.
SHORT_TEXT = "Hello world. This is a test of Chorus."
#: Three times as many words, in four sentences (so it also crosses chunk borders).
LONGER_TEXT = (
    "Hello world. This is a test of Chorus, a server that speaks three dialects of the same "
    "language. It turns text into speech and streams the audio back while it is still being "
    "made. Every client should hear the same voice, whichever interface it chose."
)
#: Seconds of audio SHORT_TEXT may give at speed 1.0.
SHORT_SECONDS = (1.8, 4.0)
#: The bundled Piper voice's sample rate.
PIPER_RATE = 22050
#: What PyAV may call the decoders of these formats.
MP3 = {"mp3", "mp3float"}
OPUS = {"opus", "libopus"}

# Headerless outputs: the demuxer must be named and told the rate. ADTS probing is unreliable on
# short in-memory streams, so it is named too.
_DEMUXERS = {"pcm": "s16le", "s16le": "s16le", "ulaw": "mulaw", "alaw": "alaw", "aac": "aac"}


@dataclass
class Decoded:
    container: str
    codec: str
    sample_rate: int
    duration: float
    samples: np.ndarray  # mono, float in [-1, 1]


def decode(data: bytes | Path, raw: str | None = None, rate: int | None = None) -> Decoded:
    """Decode `data` (bytes, or a file) with PyAV; fails if it does not decode. `raw` names the
    format of headerless audio (pcm, ulaw, alaw; also aac for ADTS), with its `rate`."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if rate else {}
    fmt = _DEMUXERS.get(raw) if raw else None
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source, format=fmt, options=options) as container:
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        frames, count = [], 0
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray())
            count += frame.samples
        decoded_rate = stream.codec_context.sample_rate or stream.rate
        container_name = container.format.name
    pcm = np.concatenate([f.reshape(-1) if f.shape[0] == 1 else f[0] for f in frames]) if frames else np.zeros(0)
    if pcm.dtype.kind == "i":
        pcm = pcm.astype(np.float64) / 32768.0
    seconds = count / decoded_rate
    return Decoded(container_name, codec, decoded_rate, seconds, pcm.astype(np.float64))


def voice_like(seconds: float, rate: int) -> np.ndarray:
    """A voiced, vowel-like tone with a slow wobble: a reference recording a cloning backend's
    speaker encoder can chew on."""
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))


def write_voice_like_wav(path: Path, seconds: float, rate: int) -> None:
    """`voice_like` as 16-bit mono WAV."""
    write_wav(path, voice_like(seconds, rate), rate)


#: (container, codec) a voice recording is encoded to by `encoded_voice`.
RECORDING_FORMATS = {"wav": ("wav", "pcm_s16le"), "mp3": ("mp3", "libmp3lame"), "flac": ("flac", "flac"),
                     "ogg": ("ogg", "libopus"), "webm": ("webm", "libopus"), "m4a": ("mp4", "aac")}


def encoded_voice(seconds: float, rate: int = 44100, fmt: str = "wav", stereo: bool = False) -> bytes:
    """`voice_like` encoded as a user's recording might be: `fmt` (a RECORDING_FORMATS key)."""
    container_name, codec = RECORDING_FORMATS[fmt]
    samples = voice_like(seconds, rate).astype(np.float32)
    layout = "stereo" if stereo else "mono"
    planes = np.stack([samples, samples]) if stereo else samples[None, :]
    out = io.BytesIO()
    with av.open(out, "w", format=container_name) as container:
        stream = container.add_stream(codec, rate=48000 if codec == "libopus" else rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=stream.codec_context.sample_rate)
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(piece))
        container.mux(stream.encode(None))
    return out.getvalue()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """`samples` (floats in -1..1) as 16-bit mono WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def audio_seconds(data: bytes | Path) -> float:
    """Seconds of audio in a whole encoded file (0 if it holds none); fails if it does not decode."""
    return decode(data).duration


def pcm_seconds(data: bytes, rate: int = 24000) -> float:
    """Duration of raw s16le mono PCM."""
    return len(data) / 2 / rate


def assert_speech(audio: Decoded, seconds: tuple[float, float] = SHORT_SECONDS) -> None:
    """Audio of a plausible length that is not silence."""
    low, high = seconds
    assert low <= audio.duration <= high, f"{audio.duration:.2f} s of audio, expected {low}-{high}"
    assert np.sqrt(np.mean(audio.samples**2)) > 0.01, "the audio is (nearly) silent"


def parse_sse(body: bytes) -> list[dict]:
    """The JSON payloads of a `text/event-stream` body's `data:` events."""
    events = []
    for block in body.decode().split("\n\n"):
        data = [line[len("data:"):].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events
