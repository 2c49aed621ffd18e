"""What a listener hears: every route family and every format it offers, for Piper (the bundled
voice, in process) and for Kokoro-82M as released (its worker in the Kokoro image, `chorus serve`
in http mode), transcribed by an ASR (tests/hearing.py) and compared with the same text
synthesised by the backend alone, without the router: each must be heard as well as that, give or
take one word in 25 (SLACK), and last as long (the same words at the same rate). Speed is heard
on every family that has it, against the backend alone at the same speed.

Every format is heard through Piper. Kokoro synthesises at about its real time here, so through
it each family is heard in the formats that take their own path from its 24 kHz (kept, resampled
up, down to telephony rates, a compressed codec) and at another speed: the encoders after that are
the router's, the same for every backend.

The sockets (ElevenLabs' stream-input, Wyoming's synthesize-chunk) get the text a word at a time,
as a language model writes it. Each test hears its clips in one batch; the backend alone is heard
once per backend, speed and language.

Kokoro's voices here are Japanese, and speak English only where the request names the language:
OpenAI's API has no field for it and a named Wyoming voice carries none, so on those two the voice
speaks Japanese, which the English ASR cannot hear. There its audio is compared with the backend
alone's instead: as long, and as loud at the same moments."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from tests.audio import PIPER_RATE, Decoded, decode
from tests.hearing import HARVARD, SLACK, Listener, word_error_rate
from tests.processes import chorus_server, free_port
from tests.released_kokoro import JAPANESE

#: A test synthesises up to ten clips of Kokoro at about its real time on two busy cores, and
#: hears them: more than the suite's five minutes on a slow day.
pytestmark = pytest.mark.timeout(900)

#: The speed the speed clips ask for: within every family's range (ElevenLabs' is 0.7 to 1.2).
FAST = 1.2
#: How far a clip's length may stray from the backend alone's (encoders pad and trim a little).
LENGTH = 0.1


@dataclass
class Speaker:
    """One backend behind `chorus serve`: where to reach it, what to ask for, and its audio alone."""

    url: str
    wyoming_port: int
    model: str
    voice: str
    rate: int
    #: The language each request names (None: the voice's own).
    language: str | None
    #: The backend alone, without the router: (text, speed, language) -> its audio.
    alone: Callable[[str, float, str | None], Decoded]
    #: Text in the voice's own language that the English ASR cannot hear, for the routes that
    #: name a voice but no language (OpenAI's, Wyoming's); None where the voice's own is English.
    own_text: str | None = None
    #: Heard in every format (else in each family's core formats: see the module's text).
    every_format: bool = True
    _references: dict = field(default_factory=dict)

    def reference(self, listener: Listener, speed: float, language: str | None) -> tuple[float, float]:
        """How long the backend alone takes to say HARVARD and how well it is heard (once per
        speed and language)."""
        key = (speed, language)
        if key not in self._references:
            audio = self.alone(HARVARD, speed, language)
            self._references[key] = (audio.duration, word_error_rate(HARVARD, listener.hear({"alone": audio})["alone"]))
        return self._references[key]


def _piper_alone(models: Path) -> Callable[[str, float, str | None], Decoded]:
    from functions import create_backend
    from functions.config import ModelConfig
    from functions.protocol import SynthesisRequest

    backend = create_backend(ModelConfig(name="tts-1", backend="piper",
                                         parameters={"model": "en_US-joe-medium.onnx"}), models)
    backend.load()

    def alone(text: str, speed: float, language: str | None) -> Decoded:
        pcm = b"".join(piece for piece in backend.synthesize(SynthesisRequest(model="tts-1", text=text, speed=speed))
                       if isinstance(piece, bytes))
        return decode(pcm, raw="pcm", rate=backend.sample_rate)

    return alone


@pytest.fixture(scope="module")
def piper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Speaker]:
    from tests._live import piper_setup

    root = tmp_path_factory.mktemp("heard-piper")
    configs, models = piper_setup(root)
    # The bundled voice with its noise off: as shipped it draws noise at every synthesis, so two
    # takes of one text are heard a word apart now and then, and a route would be blamed for it.
    # Without, the same text is the same audio however it is asked for.
    voice_config = models / "en_US-joe-medium.onnx.json"
    settings = json.loads(voice_config.read_text())
    settings["inference"].update(noise_scale=0.0, noise_w=0.0)
    voice_config.write_text(json.dumps(settings))
    port = free_port()
    with chorus_server(models, root / "server.log", configs, env={"CHORUS_WYOMING_PORT": str(port)}) as server:
        yield Speaker(server.url, port, "tts-1", "en_US-joe-medium", PIPER_RATE, None, _piper_alone(models))


@pytest.fixture(scope="module")
def kokoro(released_kokoro_chorus, released_kokoro_worker: str) -> Speaker:
    from tests.released_kokoro import CONFIG, RATE
    from tests.tiny_models.harness import pcm, synthesize

    def alone(text: str, speed: float, language: str | None) -> Decoded:
        request = {"text": text, "speed": speed, **({"language": language} if language else {})}
        return decode(pcm(synthesize(released_kokoro_worker, CONFIG, **request), RATE), raw="pcm", rate=RATE)

    # English in its Japanese voice: every route that can name a language names English.
    return Speaker(released_kokoro_chorus.url, released_kokoro_chorus.wyoming_port, CONFIG["name"], "jf_alpha",
                   RATE, "en", alone, own_text=JAPANESE, every_format=False)


@pytest.fixture(params=["piper", pytest.param("kokoro", marks=pytest.mark.images)])
def speaker(request: pytest.FixtureRequest) -> Speaker:
    return request.getfixturevalue(request.param)


def formats(speaker: Speaker, core: list, rest: list) -> list:
    """The cases a test hears: `core` (a format of each path from the backend's rate, and a speed),
    then `rest` where the backend hears every format."""
    return core + rest if speaker.every_format else core


def assert_heard(listener: Listener, speaker: Speaker, clips: dict[str, tuple[Decoded, float, str | None]]) -> None:
    """Each clip (its audio, speed, language) is heard within SLACK of the backend alone at the same
    speed and language, and lasts as long as that."""
    references = {(speed, language): speaker.reference(listener, speed, language)
                  for _, speed, language in clips.values()}
    heard = listener.hear({name: audio for name, (audio, _, _) in clips.items()})
    problems = []
    for name, (audio, speed, language) in clips.items():
        seconds, reference_wer = references[(speed, language)]
        wer = word_error_rate(HARVARD, heard[name])
        if wer > reference_wer + SLACK:
            problems.append(f"{name}: word error rate {wer:.2f} against {reference_wer:.2f} alone: {heard[name]!r}")
        if abs(audio.duration - seconds) > LENGTH * seconds:
            problems.append(f"{name}: {audio.duration:.2f} s of audio against {seconds:.2f} s alone")
    assert not problems, "\n".join(problems)
    # The backend alone is heard saying the text: the comparison means something.
    assert all(wer <= 0.25 for _, wer in references.values()), references


def _envelope(audio: Decoded) -> np.ndarray:
    """Loudness every 10 ms."""
    frame = audio.sample_rate // 100
    frames = audio.samples[: len(audio.samples) // frame * frame].reshape(-1, frame)
    return np.sqrt(np.mean(frames**2, axis=1))


def _best_correlation(one: np.ndarray, other: np.ndarray, lags: int = 10) -> float:
    best = -1.0
    for lag in range(lags + 1):
        for late, early in ((one[lag:], other), (other[lag:], one)):
            n = min(len(late), len(early))
            best = max(best, float(np.corrcoef(late[:n], early[:n])[0, 1]))
    return best


def pieces(text: str) -> list[str]:
    """`text` as a language model writes it: a word at a time (where it has no spaces, as
    Japanese, two characters at a time)."""
    if " " in text:
        return [word + " " for word in text.split()]
    return [text[start:start + 2] for start in range(0, len(text), 2)]


def assert_like_alone(speaker: Speaker, clips: dict[str, tuple[Decoded, float]]) -> None:
    """For speech the ASR cannot hear (the voice's own language): each clip (its audio, speed)
    lasts as long as the backend alone's of the same text, and its loudness rises and falls with
    it (correlation of 10 ms envelopes at least 0.9, the best of a lag of up to 0.1 s, so an
    encoder's delay counts for nothing)."""
    problems = []
    alone = {speed: speaker.alone(speaker.own_text, speed, None) for _, speed in clips.values()}
    for name, (audio, speed) in clips.items():
        reference = alone[speed]
        if abs(audio.duration - reference.duration) > LENGTH * reference.duration:
            problems.append(f"{name}: {audio.duration:.2f} s of audio against {reference.duration:.2f} s alone")
            continue
        best = _best_correlation(_envelope(audio), _envelope(reference))
        if best < 0.9:
            problems.append(f"{name}: its loudness follows the backend alone's only to a correlation of {best:.2f}")
    assert not problems, "\n".join(problems)


def test_openai_speech_is_heard_in_every_format(speaker: Speaker, listener: Listener) -> None:
    # OpenAI's API names no language: the voice speaks its own, which the ASR hears only in English.
    text = speaker.own_text or HARVARD
    clips = {}
    for fmt, speed in formats(speaker, [("mp3", 1.0), ("pcm", 1.0), ("mp3", FAST)],
                              [("opus", 1.0), ("aac", 1.0), ("flac", 1.0), ("wav", 1.0)]):
        response = httpx.post(f"{speaker.url}/v1/audio/speech", timeout=300, json={
            "model": speaker.model, "input": text, "voice": speaker.voice, "response_format": fmt, "speed": speed})
        assert response.status_code == 200, response.text
        audio = decode(response.content, raw="pcm", rate=24000) if fmt == "pcm" else decode(
            response.content, raw="aac" if fmt == "aac" else None)
        clips[f"{fmt} at {speed}"] = (audio, speed)
    if speaker.own_text:
        assert_like_alone(speaker, clips)
    else:
        assert_heard(listener, speaker, {name: (audio, speed, None) for name, (audio, speed) in clips.items()})


def test_localai_tts_is_heard_in_every_format(speaker: Speaker, listener: Listener) -> None:
    clips = {}
    for fmt in formats(speaker, ["wav", "mp3"], ["opus", "flac", "aac"]):
        body = {"model": speaker.model, "input": HARVARD, "voice": speaker.voice, "response_format": fmt}
        if speaker.language:
            body["language"] = speaker.language
        response = httpx.post(f"{speaker.url}/tts", json=body, timeout=300)
        assert response.status_code == 200, response.text
        clips[fmt] = (decode(response.content, raw="aac" if fmt == "aac" else None), 1.0, speaker.language)
    assert_heard(listener, speaker, clips)


def _eleven_decode(data: bytes, output_format: str) -> Decoded:
    codec, rate = output_format.split("_")[:2]
    if codec in ("pcm", "ulaw", "alaw"):
        return decode(data, raw=codec, rate=int(rate))
    return decode(data)


def _eleven_formats(speaker: Speaker) -> list[str]:
    return formats(speaker, ["mp3_44100_128", f"pcm_{speaker.rate}", "ulaw_8000"],
                   ["opus_48000_64", "wav_16000", "alaw_8000"])


def test_elevenlabs_http_is_heard_in_every_format(speaker: Speaker, listener: Listener) -> None:
    clips = {}
    cases = [(fmt, "", 1.0) for fmt in _eleven_formats(speaker)]
    cases += formats(speaker, [("pcm_16000", "/with-timestamps", 1.0), ("mp3_44100_128", "", FAST)],
                     [("mp3_44100_128", "/stream", 1.0)])
    for fmt, route, speed in cases:
        body = {"text": HARVARD, "model_id": speaker.model, "voice_settings": {"speed": speed}}
        if speaker.language:
            body["language_code"] = speaker.language
        response = httpx.post(f"{speaker.url}/v1/text-to-speech/{speaker.voice}{route}",
                              params={"output_format": fmt}, json=body, timeout=300)
        assert response.status_code == 200, response.text
        data = base64.b64decode(response.json()["audio_base64"]) if route == "/with-timestamps" else response.content
        clips[f"{fmt}{route} at {speed}"] = (_eleven_decode(data, fmt), speed, speaker.language)
    assert_heard(listener, speaker, clips)


def _socket(speaker: Speaker, fmt: str, speed: float) -> bytes:
    """The stream-input socket, the text sent a word at a time; the audio of its messages."""
    query = {"model_id": speaker.model, "output_format": fmt}
    if speaker.language:
        query["language_code"] = speaker.language
    url = f"ws{speaker.url.removeprefix('http')}/v1/text-to-speech/{speaker.voice}/stream-input?{urlencode(query)}"
    audio = b""
    with connect(url, proxy=None, open_timeout=20, close_timeout=10, max_size=None) as ws:
        ws.send(json.dumps({"text": " ", "voice_settings": {"speed": speed}}))
        for piece in pieces(HARVARD):
            ws.send(json.dumps({"text": piece}))
        ws.send(json.dumps({"text": ""}))
        while True:
            message = json.loads(ws.recv(timeout=300))
            assert "error" not in message, message
            if message.get("audio"):
                audio += base64.b64decode(message["audio"])
            if message.get("isFinal"):
                return audio


def test_elevenlabs_socket_is_heard_word_by_word_in_every_format(speaker: Speaker, listener: Listener) -> None:
    cases = formats(speaker, [("mp3_44100_128", 1.0), ("mp3_44100_128", FAST)],
                    [(fmt, 1.0) for fmt in _eleven_formats(speaker) if fmt != "mp3_44100_128"])
    clips = {f"{fmt} at {speed}": (_eleven_decode(_socket(speaker, fmt, speed), fmt), speed, speaker.language)
             for fmt, speed in cases}
    assert_heard(listener, speaker, clips)


async def _wyoming(speaker: Speaker, text: str) -> Decoded:
    """Home Assistant's streaming synthesis, the text a word at a time; the PCM of its audio chunks."""
    async with AsyncTcpClient("127.0.0.1", speaker.wyoming_port, read_timeout=300) as connection:
        # A named voice carries no language in Wyoming: it speaks its own.
        await connection.write_event(SynthesizeStart(voice=SynthesizeVoice(name=f"{speaker.model}:{speaker.voice}")).event())
        for piece in pieces(text):
            await connection.write_event(SynthesizeChunk(text=piece).event())
        await connection.write_event(SynthesizeStop().event())
        rate, chunks = None, []
        while (event := await connection.read_event()).type != "synthesize-stopped":
            if AudioStart.is_type(event.type):
                rate = AudioStart.from_event(event).rate
            elif AudioChunk.is_type(event.type):
                chunks.append(AudioChunk.from_event(event).audio)
    assert rate == speaker.rate
    return decode(b"".join(chunks), raw="pcm", rate=rate)


def test_wyoming_is_heard_word_by_word(speaker: Speaker, listener: Listener) -> None:
    if speaker.own_text:
        assert_like_alone(speaker, {"wyoming": (asyncio.run(_wyoming(speaker, speaker.own_text)), 1.0)})
    else:
        assert_heard(listener, speaker, {"wyoming": (asyncio.run(_wyoming(speaker, HARVARD)), 1.0, None)})
