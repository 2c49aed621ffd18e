"""Voice-agent frameworks' own TTS plugins, unchanged, pointed at a real Chorus: LiveKit Agents'
ElevenLabs plugin (its streaming multi-stream-input socket, with word timings, and its HTTP
`/stream` path) and its OpenAI plugin (`/v1/audio/speech` as server-sent events). No room and no
worker: the plugins run standalone, the way LiveKit's own plugin tests drive them.

Most users leave the plugins at their defaults, so those are tested as they come: ElevenLabs'
`mp3_22050_32` (and every other encoding the plugin offers) and OpenAI's `mp3` as server-sent
events, each speaking a reply in full; only the base URL, the voice and the model name (ElevenLabs'
own model names mean nothing to Chorus) are set. A barge-in is tested against the app served in
this process, whose runner counts the chunks the backend begins."""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio import to_thread

from tests._agents import (
    HELD_SENTENCE,
    LONG_MARK,
    LONG_REPLY,
    REPLY,
    SENTENCE_CHUNKS,
    assert_whole,
    http_seconds,
)
from tests._live import ScriptedRunner, live_app, piper_setup
from tests.audio import PIPER_RATE, SHORT_SECONDS, SHORT_TEXT, assert_speech, decode

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("livekit.agents")
from livekit.agents import APIConnectOptions  # noqa: E402
from livekit.agents.types import NOT_GIVEN, USERDATA_TIMED_TRANSCRIPT  # noqa: E402
from livekit.plugins import elevenlabs, openai  # noqa: E402
from livekit.plugins.elevenlabs.models import TTSEncoding  # noqa: E402

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


@asynccontextmanager
async def eleven(url: str, encoding: str = "pcm_22050", seconds: float = 60) -> AsyncIterator[elevenlabs.TTS]:
    """The plugin with `encoding` (NOT_GIVEN: its default, mp3_22050_32) and every other option
    at its default, on an HTTP session of its own; given `seconds`, and closed at the end.
    model: Chorus's model name (the plugin's default, eleven_turbo_v2_5, is ElevenLabs' own)."""
    async with aiohttp.ClientSession() as session:
        tts = elevenlabs.TTS(api_key="not-needed", base_url=f"{url}/v1", voice_id=VOICE, model="tts-1",
                             encoding=encoding, http_session=session)
        try:
            with anyio.fail_after(seconds):
                yield tts
        finally:
            await tts.aclose()


async def speak_streamed(tts: elevenlabs.TTS, text: str) -> Spoken:
    """`text` pushed word by word into one stream, as an LLM's tokens would be."""
    spoken = Spoken()
    stream = tts.stream(conn_options=NO_RETRY)
    try:
        for word in text.split(" "):
            stream.push_text(word + " ")
            await asyncio.sleep(0)
        stream.end_input()
        try:
            async for event in stream:
                frame = event.frame
                spoken.pcm += bytes(frame.data)
                spoken.rates.add(frame.sample_rate)
                spoken.channels.add(frame.num_channels)
                spoken.words += frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])
        except Exception as exc:
            heard = f"{spoken.seconds:.2f} s of audio" if spoken.rates else "no audio"
            raise AssertionError(f"the stream failed after {heard}: {exc!r}") from exc
    finally:
        await stream.aclose()
    return spoken


async def streamed(url: str, text: str, encoding: str = "pcm_22050") -> Spoken:
    async with eleven(url, encoding) as tts:
        return await speak_streamed(tts, text)


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
    async with eleven(server.url) as tts:
        both = await asyncio.gather(*(speak_streamed(tts, text) for text in texts))
    for spoken, text in zip(both, texts, strict=True):
        assert spoken.rates == {PIPER_RATE}
        assert_pcm_speech(spoken.pcm, PIPER_RATE, (1.5, 8.0))
        assert "".join(spoken.words).split() == text.split()
    assert both[0].pcm != both[1].pcm


async def test_livekit_elevenlabs_synthesize_over_http(server):
    """synthesize() is the plugin's HTTP path: POST /v1/text-to-speech/{voice}/stream."""
    async with eleven(server.url) as tts:
        frame = await tts.synthesize(SHORT_TEXT, conn_options=NO_RETRY).collect()
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


# --- The plugins at their defaults, each speaking a reply in full ----------------------------

#: Every encoding the ElevenLabs plugin offers; its default (mp3_22050_32) is tested as the
#: default (no encoding given). Less "mp3_44100": the plugin lists it, but it is no ElevenLabs
#: output format (ElevenLabs' own SDK lists every MP3 code with its bit rate) and Chorus refuses
#: it as it refuses any code ElevenLabs does not document.
ENCODINGS = tuple(e for e in typing.get_args(TTSEncoding) if e != "mp3_44100")
DEFAULT_ENCODING = "mp3_22050_32"


def encoding_option(encoding: str):
    return NOT_GIVEN if encoding == DEFAULT_ENCODING else encoding


def rate_of(encoding: str) -> int:
    return int(encoding.split("_")[1])


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e}-default" if e == DEFAULT_ENCODING else e)
async def test_livekit_elevenlabs_stream_speaks_a_reply_whole(server, encoding):
    """tts.stream() (the multi-stream-input socket) as an agent uses it: the LLM's words pushed
    as they come, then end_input(). With auto_mode (the default) each sentence goes out with
    flush=true, then an empty flush and close_context; the plugin decodes the context's audio as
    one stream (one decoder per context), so an MP3 context must be one MP3 stream.

    Its timed words are the reply's words. (The plugin takes each message's alignment as it comes,
    and ElevenLabs times each generation from its own start: the clock restarts with each flushed
    sentence, so the words are not in order across sentences.)"""
    reference = await http_seconds(server.url, REPLY)
    spoken = await streamed(server.url, REPLY, encoding_option(encoding))
    assert spoken.rates == {rate_of(encoding)} and spoken.channels == {1}
    assert_whole(spoken.seconds, reference, f"LiveKit's ElevenLabs stream() ({encoding})")
    assert "".join(spoken.words).split() == REPLY.split()
    # A flushed sentence's last word ends where the next generation's clock starts at 0 (ElevenLabs'
    # times are relative to each one); every other word, the reply's last one included, does not.
    backwards = [(str(w), w.start_time, w.end_time) for w in spoken.words if w.end_time < w.start_time
                 and (w is spoken.words[-1] or not str(w).rstrip().endswith((".", "?", "!")))]
    assert not backwards, f"words that end before they start: {backwards}"


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e}-default" if e == DEFAULT_ENCODING else e)
async def test_livekit_elevenlabs_synthesize_speaks_a_reply_whole(server, encoding):
    """tts.synthesize(): POST /v1/text-to-speech/{voice}/stream?output_format=...&enable_logging=true."""
    reference = await http_seconds(server.url, REPLY)
    async with eleven(server.url, encoding_option(encoding)) as tts:
        frame = await tts.synthesize(REPLY, conn_options=NO_RETRY).collect()
    assert frame.sample_rate == rate_of(encoding) and frame.num_channels == 1
    assert_whole(frame.duration, reference, f"LiveKit's ElevenLabs synthesize() ({encoding})")


#: What the OpenAI plugin may ask for; mp3 is its default.
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS, ids=lambda f: f"{f}-default" if f == "mp3" else f)
async def test_livekit_openai_speaks_a_reply_whole(server, response_format):
    """openai.TTS() at its defaults: gpt-4o-mini-tts, voice ash, response_format mp3, and
    stream_format=sse (the plugin asks SSE of every model but tts-1 and tts-1-hd); it decodes
    the deltas of one response as one stream."""
    fmt = NOT_GIVEN if response_format == "mp3" else response_format
    reference = await http_seconds(server.url, REPLY)
    tts = openai.TTS(base_url=f"{server.url}/v1", api_key="not-needed", response_format=fmt)
    try:
        with anyio.fail_after(60):
            frame = await tts.synthesize(REPLY, conn_options=NO_RETRY).collect()
    finally:
        await tts.aclose()
    assert frame.num_channels == 1
    assert_whole(frame.duration, reference, f"LiveKit's OpenAI plugin ({response_format})")


# --- Barge-in ------------------------------------------------------------------------------


class InactiveContextFinal(logging.Handler):
    """The plugin logs (at debug level) each message the server sends for a context it no longer
    listens to: once a stream is closed, the server's final message for it shows here."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        data = record.__dict__.get("lk.pii.data")
        if isinstance(data, dict) and data.get("isFinal"):
            self.seen.set()


@pytest.fixture
def inactive_final():
    plugin_log = logging.getLogger("livekit.plugins.elevenlabs")
    handler, level = InactiveContextFinal(), plugin_log.level
    plugin_log.addHandler(handler)
    plugin_log.setLevel(logging.DEBUG)
    yield handler
    plugin_log.removeHandler(handler)
    plugin_log.setLevel(level)


async def long_reply_at_its_first_audio(tts, text_ended: bool):
    """The LLM's long reply pushed word by word into a new stream of `tts` (and its end, where
    `text_ended`), returned at its first audio frame: when a user's barge-in comes."""
    stream = tts.stream(conn_options=NO_RETRY)
    for word in LONG_REPLY.split(" "):
        stream.push_text(word + " ")
    if text_ended:
        stream.end_input()
    event = await stream.__anext__()
    assert len(event.frame.data) > 0
    return stream


async def test_livekit_barge_in_while_the_reply_is_written_stops_the_backend(tmp_path, inactive_final):
    """The user speaks while the LLM is still writing a long reply: at the first audio the agent
    closes the stream, and the plugin sends close_context (its sentences went out with
    flush=true, but no empty flush ended the text). The backend stops within one chunk, and the
    next reply on the same TTS (the same socket) speaks whole."""
    configs, models = piper_setup(tmp_path)
    runner = ScriptedRunner(models, gated=[HELD_SENTENCE])
    with live_app(configs, models, runner, chunk_chars=SENTENCE_CHUNKS) as url:
        reference = await http_seconds(url, REPLY)
        async with eleven(url, NOT_GIVEN, seconds=180) as tts:
            stream = await long_reply_at_its_first_audio(tts, text_ended=False)
            await to_thread.run_sync(runner.wait_at_gate, HELD_SENTENCE)
            begun = runner.begun_with(LONG_MARK)
            await stream.aclose()
            await inactive_final.seen.wait()
            after = runner.begun_with(LONG_MARK)
            assert after <= begun + 1, (f"{begun} chunks of the interrupted reply were begun at the "
                                        f"barge-in, {after} by its final message")
            following = await speak_streamed(tts, REPLY)
    assert_whole(following.seconds, reference, "the reply after the barge-in")


async def test_livekit_reply_after_a_barge_in_on_a_closed_reply_speaks_whole(tmp_path):
    """The LLM had finished: the plugin sent the whole reply, an empty flush and close_context.
    At the first audio the agent closes the stream; the plugin sends nothing more (it already
    closed the context) and drops what still comes for it. The next reply on the same socket
    still speaks whole. (The server is never told of this barge-in, so no server can stop the
    backend's work on the old reply: nothing about it is asserted here.)"""
    configs, models = piper_setup(tmp_path)
    with live_app(configs, models, chunk_chars=SENTENCE_CHUNKS) as url:
        reference = await http_seconds(url, REPLY)
        async with eleven(url, NOT_GIVEN, seconds=180) as tts:
            stream = await long_reply_at_its_first_audio(tts, text_ended=True)
            await stream.aclose()
            following = await speak_streamed(tts, REPLY)
    assert_whole(following.seconds, reference, "the reply after the barge-in")
