"""Voice-agent frameworks' own TTS plugins, unchanged, pointed at a real Chorus: LiveKit Agents'
ElevenLabs plugin (its streaming multi-stream-input socket, with word timings, and its HTTP
`/stream` path) and its OpenAI plugin (`/v1/audio/speech` as server-sent events). No room and no
worker: the plugins run standalone, the way LiveKit's own plugin tests drive them."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from tests.audio import PIPER_RATE, SHORT_SECONDS, SHORT_TEXT, assert_speech, decode

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("livekit.agents")
from livekit.agents import APIConnectOptions  # noqa: E402
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT  # noqa: E402
from livekit.plugins import elevenlabs, openai  # noqa: E402

pytestmark = pytest.mark.anyio

VOICE = "en_US-joe-medium"
#: One sentence of twelve words, spoken in about 3 s.
SENTENCE = "The quick brown fox jumps over the lazy dog beside the quiet river."
#: Fail at once rather than retry: a refusal must show as this test's failure.
NO_RETRY = APIConnectOptions(max_retry=0, timeout=30)


class Spoken:
    """What one LiveKit stream gave: its frames' PCM, rate and timed words."""

    def __init__(self) -> None:
        self.pcm = b""
        self.rates: set[int] = set()
        self.channels: set[int] = set()
        self.words: list = []  # TimedString: str with start_time and end_time

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / next(iter(self.rates))


def eleven(url: str, session: aiohttp.ClientSession, encoding: str = "pcm_22050") -> elevenlabs.TTS:
    # model: Chorus's model name (the plugin's default, eleven_turbo_v2_5, is ElevenLabs' own).
    return elevenlabs.TTS(api_key="not-needed", base_url=f"{url}/v1", voice_id=VOICE, model="tts-1",
                          encoding=encoding, http_session=session)


async def speak_streamed(tts: elevenlabs.TTS, text: str) -> Spoken:
    """`text` pushed word by word into one stream, as an LLM's tokens would be."""
    spoken = Spoken()
    stream = tts.stream(conn_options=NO_RETRY)
    try:
        for word in text.split(" "):
            stream.push_text(word + " ")
            await asyncio.sleep(0)
        stream.end_input()
        async for event in stream:
            frame = event.frame
            spoken.pcm += bytes(frame.data)
            spoken.rates.add(frame.sample_rate)
            spoken.channels.add(frame.num_channels)
            spoken.words += frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])
    finally:
        await stream.aclose()
    return spoken


async def streamed(url: str, text: str, encoding: str = "pcm_22050") -> Spoken:
    async with aiohttp.ClientSession() as session:
        tts = eleven(url, session, encoding)
        try:
            with anyio.fail_after(60):
                return await speak_streamed(tts, text)
        finally:
            await tts.aclose()


def assert_pcm_speech(pcm: bytes, rate: int, seconds: tuple[float, float]) -> None:
    assert_speech(decode(pcm, raw="pcm", rate=rate), seconds)


def assert_words_in_order(spoken: Spoken, text: str) -> None:
    """The timed words are the text's words, in order, each starting no earlier than the one
    before and within the audio."""
    assert "".join(spoken.words).split() == text.split()
    starts = [word.start_time for word in spoken.words]
    assert starts == sorted(starts), [(str(w), w.start_time, w.end_time) for w in spoken.words]
    assert starts[0] >= 0 and starts[-1] < spoken.seconds
    for word in spoken.words[:-1]:
        assert word.start_time <= word.end_time <= spoken.seconds + 0.05, (str(word), word.start_time, word.end_time)


@pytest.mark.parametrize("encoding, rate", [("pcm_22050", PIPER_RATE), ("pcm_24000", 24000)])
async def test_livekit_streams_words_pushed_one_at_a_time(server, encoding, rate):
    spoken = await streamed(server.url, SENTENCE, encoding)
    assert spoken.rates == {rate} and spoken.channels == {1}
    assert_pcm_speech(spoken.pcm, rate, (1.5, 8.0))
    assert_words_in_order(spoken, SENTENCE)
    # The words are spread over the speech, not bunched at its start.
    assert spoken.words[len(spoken.words) // 2].start_time > spoken.seconds / 4


async def test_livekit_timed_words_end_where_the_audio_ends(server):
    """The last word's end is the audio's end. (LiveKit takes the alignment's times as they
    come, and a last word's end from the message after it: that message must not restart the
    clock at 0.)"""
    spoken = await streamed(server.url, SENTENCE)
    last = spoken.words[-1]
    assert last.start_time <= last.end_time, (str(last), last.start_time, last.end_time)
    assert abs(last.end_time - spoken.seconds) < 0.25, (last.end_time, spoken.seconds)


async def test_two_livekit_streams_at_once_each_get_their_own_audio(server):
    """Two streams of one TTS share its multi-stream socket, one context each."""
    texts = ["Hello there, this is the first stream speaking now.",
             "And a second stream says something else entirely."]
    async with aiohttp.ClientSession() as session:
        tts = eleven(server.url, session)
        try:
            with anyio.fail_after(60):
                both = await asyncio.gather(*(speak_streamed(tts, text) for text in texts))
        finally:
            await tts.aclose()
    for spoken, text in zip(both, texts, strict=True):
        assert spoken.rates == {PIPER_RATE}
        assert_pcm_speech(spoken.pcm, PIPER_RATE, (1.5, 8.0))
        assert "".join(spoken.words).split() == text.split()
    assert both[0].pcm != both[1].pcm


async def test_livekit_elevenlabs_synthesize_over_http(server):
    """synthesize() is the plugin's HTTP path: POST /v1/text-to-speech/{voice}/stream."""
    async with aiohttp.ClientSession() as session:
        tts = eleven(server.url, session)
        try:
            with anyio.fail_after(60):
                frame = await tts.synthesize(SHORT_TEXT, conn_options=NO_RETRY).collect()
        finally:
            await tts.aclose()
    assert frame.sample_rate == PIPER_RATE and frame.num_channels == 1
    assert_pcm_speech(bytes(frame.data), PIPER_RATE, SHORT_SECONDS)


async def test_livekit_openai_plugin_reads_server_sent_events(server):
    """LiveKit's OpenAI plugin asks gpt-4o-mini-tts for PCM as server-sent events and reads
    24 kHz audio."""
    tts = openai.TTS(model="gpt-4o-mini-tts", voice="ash", response_format="pcm", base_url=f"{server.url}/v1",
                     api_key="not-needed")
    try:
        with anyio.fail_after(60):
            frame = await tts.synthesize(SHORT_TEXT, conn_options=NO_RETRY).collect()
    finally:
        await tts.aclose()
    assert frame.sample_rate == 24000 and frame.num_channels == 1
    assert_pcm_speech(bytes(frame.data), 24000, SHORT_SECONDS)
