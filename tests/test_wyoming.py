"""The Wyoming server (Home Assistant's TTS protocol) as its clients drive it: the `wyoming`
package's own AsyncTcpClient against a live server, the audio decoded back to PCM; raw bytes for
the frames no proper client sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import yaml
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, Eventable, async_read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

import router.api.wyoming.server
from functions.config import ModelConfig
from functions.protocol import SynthesisRequest
from router.api.wyoming.server import SERVICE_TYPE
from router.errors import BackendUnavailable
from router.runners import PcmStream
from tests._live import HANG, ScriptedRunner, live_app, piper_setup, write_config
from tests.audio import (
    LONGER_TEXT,
    PIPER_RATE,
    SHORT_SECONDS,
    SHORT_TEXT,
    Decoded,
    assert_speech,
    decode,
    encoded_voice,
)
from tests.processes import CONFIGS, chorus_server, free_port

pytestmark = pytest.mark.anyio

JOE = "tts-1:en_US-joe-medium"
#: A model whose worker cannot be reached, as http mode sees a stopped container.
DOWN = "tts-down"
#: The Wyoming input limit the test server has (CHORUS_MAX_INPUT_CHARS_BY_ROUTE=wyoming=300).
LIMIT = 300
#: The longest part of a frame the test server reads (CHORUS_MAX_BODY_BYTES).
FRAME_LIMIT = 65536
ZEROCONF_NAME = f"chorus-test-{uuid.uuid4().hex[:8]}"


class OneWorkerDown(ScriptedRunner):
    """Real Piper, but model DOWN's backend answers as a worker that cannot be reached."""

    async def voices(self, config: ModelConfig) -> list[str]:
        self._reach(config)
        return await super().voices(config)

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        self._reach(config)
        return await super().stream(config, request)

    @staticmethod
    def _reach(config: ModelConfig) -> None:
        if config.name == DOWN:
            raise BackendUnavailable("backend 'piper' is unavailable: its worker at http://piper:9000 cannot be reached")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, OneWorkerDown]]:
    """The app with its Wyoming listener (on the app's loop, in a thread): yields the Wyoming
    port and the runner."""
    configs, models = piper_setup(tmp_path_factory.mktemp("wyoming"))
    write_config(configs, DOWN)
    runner = OneWorkerDown(models)
    port = free_port()
    with live_app(configs, models, runner, wyoming_port=port,
                  max_input_chars_by_route={"wyoming": LIMIT}, max_body_bytes=FRAME_LIMIT):
        yield port, runner


@pytest.fixture(scope="module")
def port(server: tuple[int, OneWorkerDown]) -> int:
    return server[0]


def client(port: int) -> AsyncTcpClient:
    # The read timeout only turns a server that never answers into a failure instead of a hang.
    return AsyncTcpClient("127.0.0.1", port, read_timeout=60)


async def answer(port: int, events: Sequence[Eventable | Event], until: str | None = "audio-stop") -> list[Event]:
    """What the server sends for `events` on a new connection, up to the event `until` (None: up
    to the server closing the connection, which it must)."""
    async with client(port) as connection:
        for event in events:
            await connection.write_event(event if isinstance(event, Event) else event.event())
        received = []
        while (event := await connection.read_event()) is not None:
            received.append(event)
            if event.type == until:
                break
        return received


def speech(events: list[Event]) -> Decoded:
    """The PCM of the audio-chunks, decoded at the rate audio-start gave; checks the framing:
    one audio-start, then chunks of its format, then one audio-stop."""
    types = [event.type for event in events if event.type.startswith("audio-")]
    assert types[0] == "audio-start" and types[-1] == "audio-stop" and len(types) > 2, types
    assert set(types[1:-1]) == {"audio-chunk"}, types
    start = AudioStart.from_event(next(event for event in events if AudioStart.is_type(event.type)))
    assert (start.rate, start.width, start.channels) == (PIPER_RATE, 2, 1)
    chunks = [AudioChunk.from_event(event) for event in events if AudioChunk.is_type(event.type)]
    assert {(chunk.rate, chunk.width, chunk.channels) for chunk in chunks} == {(PIPER_RATE, 2, 1)}
    return decode(b"".join(chunk.audio for chunk in chunks), raw="pcm", rate=start.rate)


def refusal(events: list[Event]) -> Error:
    """The error the server ended with (it closed the connection after it: `answer` returned)."""
    assert events and Error.is_type(events[-1].type), [event.type for event in events]
    return Error.from_event(events[-1])


async def test_describe_lists_every_model_voice_in_one_streaming_program(port):
    (event,) = await answer(port, [Describe()], until="info")
    info = Info.from_event(event)
    # Home Assistant shows only a server's first installed program: one program holds every voice.
    (program,) = info.tts
    assert program.name == "chorus" and program.installed and program.supports_synthesize_streaming
    voices = {voice.name: voice for voice in program.voices}
    assert set(voices) == {JOE, DOWN}
    joe = voices[JOE]
    assert joe.installed and joe.languages == ["en"] and not joe.speakers
    assert joe.attribution.name and joe.attribution.url.startswith("https://")
    assert "en_US-joe-medium" in joe.description and "tts-1" in joe.description
    # Its worker cannot be reached: listed, as its config names it, but not installed.
    assert not voices[DOWN].installed and voices[DOWN].languages == ["en"]


async def test_ping_is_answered_with_its_text(port):
    (event,) = await answer(port, [Ping(text="marco")], until="pong")
    assert Pong.from_event(event).text == "marco"


async def test_synthesize_answers_pcm_of_the_text(port):
    events = await answer(port, [Synthesize(text=SHORT_TEXT, voice=SynthesizeVoice(name=JOE))])
    assert_speech(speech(events), SHORT_SECONDS)


async def test_the_first_sentence_is_heard_before_the_rest_is_made(server):
    """The second sentence's synthesis is held until the first sentence's audio has arrived: a
    server that waited for the whole text would send nothing."""
    port, runner = server
    runner.release.clear()
    async with client(port) as connection:
        await connection.write_event(Synthesize(text=f"Hello there. {HANG} holds this sentence back.").event())
        events = [await connection.read_event(), await connection.read_event()]
        assert [event.type for event in events] == ["audio-start", "audio-chunk"]
        runner.release.set()
        while (event := await connection.read_event()).type != "audio-stop":
            events.append(event)
        events.append(event)
    assert_speech(speech(events), (2.0, 6.0))


@pytest.mark.parametrize(
    "voice",
    [
        SynthesizeVoice(name="tts-1"),  # a model alone: its own voice
        SynthesizeVoice(name="en_US-joe-medium"),  # a bare backend voice, as wyoming-piper names it
        SynthesizeVoice(name="tts-1", speaker="en_US-joe-medium"),  # the speaker is the model's voice
        SynthesizeVoice(language="en_US"),  # the first installed voice of the language
        None,  # the default model's own voice
    ],
    ids=["model", "bare-voice", "speaker", "language", "none"],
)
async def test_every_way_of_naming_a_voice_is_heard(port, voice):
    events = await answer(port, [Synthesize(text="Hello there, Home Assistant.", voice=voice)])
    assert_speech(speech(events), (1.0, 3.5))


async def test_a_streamed_text_is_spoken_sentence_by_sentence_and_once(port):
    async with client(port) as connection:
        await connection.write_event(SynthesizeStart(voice=SynthesizeVoice(name=JOE)).event())
        for word in ("Hello ", "world. "):  # as an LLM writes: a word at a time
            await connection.write_event(SynthesizeChunk(text=word).event())
        # The first sentence is complete: its audio comes while the rest is still unwritten.
        events = [await connection.read_event(), await connection.read_event()]
        assert [event.type for event in events] == ["audio-start", "audio-chunk"]
        for word in SHORT_TEXT.removeprefix("Hello world. ").split():
            await connection.write_event(SynthesizeChunk(text=word + " ").event())
        # Home Assistant sends the whole text again, for servers that cannot stream: not spoken.
        await connection.write_event(Synthesize(text=SHORT_TEXT, voice=SynthesizeVoice(name=JOE)).event())
        await connection.write_event(SynthesizeStop().event())
        while (event := await connection.read_event()).type != "synthesize-stopped":
            events.append(event)
        # Nothing else is spoken: the next audio is the next request's (syntheses keep their order).
        await connection.write_event(Synthesize(text="Once more.").event())
        after = []
        while (event := await connection.read_event()).type != "audio-stop":
            after.append(event)
        after.append(event)
    assert_speech(speech(events), SHORT_SECONDS)
    assert_speech(speech(after), (0.4, 1.5))


async def test_streams_follow_each_other_on_one_connection(port):
    async with client(port) as connection:
        for _ in range(2):
            await connection.write_event(SynthesizeStart().event())
            await connection.write_event(SynthesizeChunk(text="Once more.").event())
            await connection.write_event(SynthesizeStop().event())
            events = []
            while (event := await connection.read_event()).type != "synthesize-stopped":
                events.append(event)
            assert_speech(speech(events), (0.4, 2.5))


@pytest.mark.parametrize(
    ("events", "code", "words"),
    [
        ([Synthesize(text="Hi.", voice=SynthesizeVoice(name="tts-1:nobody"))], "voice_not_found", "nobody"),
        ([Synthesize(text="Hi.", voice=SynthesizeVoice(name="tts-9:en_US-joe-medium"))], "voice_not_found", "tts-9"),
        ([Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody"))], "voice_not_found", "nobody"),
        ([Synthesize(text="Hi.", voice=SynthesizeVoice(language="tlh"))], "voice_not_found", "tlh"),
        ([Synthesize(text="   ")], "invalid_request", "empty"),
        ([Synthesize(text="Hello there. " * 30)], "invalid_request", f"limit is {LIMIT}"),
        ([SynthesizeStart(), *[SynthesizeChunk(text="Hello there. ")] * 30, SynthesizeStop()],
         "invalid_request", f"limit is {LIMIT}"),
        ([SynthesizeStart(), SynthesizeStop()], "invalid_request", "text"),
        ([Synthesize(text="Hi.", voice=SynthesizeVoice(name=DOWN))], "backend_unavailable", "cannot be reached"),
        ([SynthesizeChunk(text="Hi.")], "invalid_request", "synthesize-start"),
        ([SynthesizeStart(), SynthesizeStart()], "invalid_request", "already open"),
        ([SynthesizeStop()], "invalid_request", "synthesize-start"),
    ],
    ids=["unknown-voice", "unknown-model", "unknown-name", "unknown-language", "empty", "too-long",
         "streamed-too-long", "streamed-empty", "backend-down", "chunk-without-start", "start-twice",
         "stop-without-start"],
)
async def test_a_refusal_is_an_error_event_then_the_end_of_the_connection(port, events, code, words):
    error = refusal(await answer(port, events, until=None))
    assert error.code == code and words in error.text, error
    # The server serves the next client.
    assert Info.from_event((await answer(port, [Describe()], until="info"))[0]).tts


async def test_a_saved_voice_is_listed_for_the_model_that_clones_and_refused_by_the_others(tmp_path):
    configs, models = piper_setup(tmp_path)
    # The cloning model is one whose worker is down: no XTTS is loaded for a listing and a refusal.
    (configs / f"{DOWN}.yaml").write_text(yaml.safe_dump({
        "name": DOWN, "backend": "coqui",
        "parameters": {"model": "tts_models/multilingual/multi-dataset/xtts_v2", "language": "en"},
    }))
    port = free_port()
    with live_app(configs, models, OneWorkerDown(models), wyoming_port=port) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            added = await http.post("/v1/voices/add", data={"name": "Grandpa"},
                                    files=[("files", ("take.wav", encoded_voice(2), "audio/wav"))])
        assert added.status_code == 200, added.text
        voice_id = added.json()["voice_id"]
        (event,) = await answer(port, [Describe()], until="info")
        voices = {voice.name: voice for voice in Info.from_event(event).tts[0].voices}
        assert f"tts-1:{voice_id}" not in voices
        listed = voices[f"{DOWN}:{voice_id}"]
        assert listed.description == f"Grandpa ({DOWN}, coqui)" and listed.languages == ["en"]
        # The cloning model is asked for it (its worker is down); Piper names the model that can.
        asked = refusal(await answer(port, [Synthesize(text="Hi.", voice=SynthesizeVoice(name=f"{DOWN}:{voice_id}"))],
                                     until=None))
        assert asked.code == "backend_unavailable", asked
        refused = refusal(await answer(port, [Synthesize(text="Hi.", voice=SynthesizeVoice(name=f"tts-1:{voice_id}"))],
                                       until=None))
        assert refused.code == "voice_not_found" and refused.text.endswith(f"models that can: {DOWN}"), refused


def limited_server(tmp_path_factory: pytest.TempPathFactory, **limits: object) -> Iterator[int]:
    configs, models = piper_setup(tmp_path_factory.mktemp("wyoming-limited"))
    port = free_port()
    with live_app(configs, models, wyoming_port=port, **limits):
        yield port


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Wyoming listener that closes a connection idle for 0.2 s: less than its voice takes to
    speak a paragraph."""
    yield from limited_server(tmp_path_factory, wyoming_idle_timeout=0.2)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Wyoming listener that takes three connections at once."""
    yield from limited_server(tmp_path_factory, wyoming_max_connections=3)


async def test_an_idle_connection_is_closed_but_not_while_it_hears_its_answer(impatient):
    async with client(impatient) as idle:
        assert await idle.read_event() is None  # the server closed it: nothing was asked
    # Synthesising a paragraph takes longer than the idle time: it still comes whole.
    assert_speech(speech(await answer(impatient, [Synthesize(text=LONGER_TEXT)])), (6.0, 20.0))


async def test_past_the_connection_limit_a_client_gets_an_error_event(crowded):
    async with client(crowded) as first, client(crowded) as second, client(crowded) as third:
        for held in (first, second, third):
            await held.write_event(Describe().event())
            assert (await held.read_event()).type == "info"
        # Refused with its requests unread, a client still reads the error and a clean end
        # (closing on unread bytes would reset the connection, and a reset can lose the error).
        error = refusal(await answer(crowded, [Describe()] * 200, until=None))
        assert error.code == "overloaded" and "3 Wyoming connections" in error.text
    # Once they have closed, the next client is served.
    assert Info.from_event((await answer(crowded, [Describe()], until="info"))[0]).tts


async def test_a_wrong_data_type_is_refused(port):
    error = refusal(await answer(port, [Event("synthesize", {"text": ["not", "a", "string"]})], until=None))
    assert error.code == "invalid_request"


async def _raw(port: int, data: bytes, close: bool = False) -> Event | None:
    """Send `data` on a raw connection (then half-close it with `close`); the event the server
    answers with, None if it just closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):  # the server may close while bytes are in flight
            writer.write(data)
            await writer.drain()
            if close:
                writer.write_eof()
        with contextlib.suppress(ConnectionError):
            event = await asyncio.wait_for(async_read_event(reader), 60)
            # After its answer the server closes: nothing more comes.
            assert await asyncio.wait_for(reader.read(), 60) == b""
            return event
        return None
    finally:
        writer.close()


def _header(**fields: object) -> bytes:
    return json.dumps({"type": "synthesize", **fields}).encode() + b"\n"


@pytest.mark.parametrize(
    ("data", "close", "problem"),
    [
        (b"{this is not json}\n", False, "not the JSON"),
        (b"[1, 2, 3]\n", False, "malformed event"),
        (_header(data={"text": "x"}, data_length="twelve"), False, "malformed event"),
        # A header line with no end, longer than any event may be.
        (b'{"type": "synthesize", "data": {"text": "' + b"a" * (FRAME_LIMIT + 10), False, "header line"),
        # Lengths far past the limit: refused before a byte is waited for, let alone allocated.
        (_header(data_length=10**12), False, str(10**12)),
        (_header(payload_length=10**12), False, str(10**12)),
        # Lengths that promise more than is sent, the client then gone: the server just closes.
        (_header(data_length=500) + b'{"text": ', True, None),
        (_header(data={"text": "Hi."}, payload_length=500) + b"\x00" * 10, True, None),
    ],
    ids=["bad-json", "not-an-object", "length-not-a-number", "endless-header", "huge-data-length",
         "huge-payload-length", "data-length-lies", "payload-length-lies"],
)
async def test_a_malformed_frame_never_takes_the_server_down(port, data, close, problem):
    event = await _raw(port, data, close)
    if problem is None:
        assert event is None
    else:
        error = Error.from_event(event)
        assert error.code == "malformed_event" and problem in error.text, error
    events = await answer(port, [Synthesize(text="Still here.", voice=SynthesizeVoice(name=JOE))])
    assert_speech(speech(events), (0.4, 2.5))


async def test_a_lone_surrogate_in_the_text_is_the_clients_error(port):
    """JSON can escape half a UTF-16 surrogate pair; it is no character (the wyoming package
    cannot even encode it: this frame is written by hand)."""
    header = json.dumps({"type": "synthesize", "data": {"text": "\ud800 broken", "voice": {"name": JOE}}})
    error = Error.from_event(await _raw(port, header.encode() + b"\n"))
    assert error.code == "invalid_request" and "surrogate" in error.text, error


async def test_a_frame_whose_rest_never_comes_is_refused(port, monkeypatch):
    # The bound is shortened so that the test does not wait out the real one.
    monkeypatch.setattr(router.api.wyoming.server, "FRAME_SECONDS", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_header(data={"text": "Hi."}, payload_length=500) + b"\x00" * 10)  # and then nothing
        await writer.drain()
        error = Error.from_event(await asyncio.wait_for(async_read_event(reader), 60))
        assert error.code == "malformed_event" and "did not arrive" in error.text
    finally:
        writer.close()


def test_zeroconf_announces_the_wyoming_port(tmp_path: Path):
    """`chorus serve` announces itself, found by a browser in another process, as Home
    Assistant's would be: asked after the announcement is over, so the reply is what answers."""
    import subprocess
    import sys

    port = free_port()
    env = {"CHORUS_WYOMING_PORT": str(port), "CHORUS_WYOMING_ZEROCONF": ZEROCONF_NAME}
    (tmp_path / "models").mkdir()
    browse = (
        "import asyncio\n"
        "from zeroconf.asyncio import AsyncZeroconf\n"
        "async def main():\n"
        "    browser = AsyncZeroconf(interfaces=['127.0.0.1'])\n"
        f"    found = await browser.async_get_service_info({SERVICE_TYPE!r}, {ZEROCONF_NAME + '.' + SERVICE_TYPE!r}, timeout=10000)\n"
        "    await browser.async_close()\n"
        "    print(found.port if found else None, found.parsed_addresses() if found else [])\n"
        "asyncio.run(main())\n"
    )
    with chorus_server(tmp_path / "models", tmp_path / "serve.log", CONFIGS, env=env):
        result = subprocess.run([sys.executable, "-c", browse], capture_output=True, text=True, timeout=60)
    assert result.stdout.split(" ", 1)[0] == str(port), result.stdout + result.stderr
    assert "127.0.0.1" in result.stdout


async def test_chorus_serve_wyoming_port_serves_both_protocols_and_warns_about_keys(tmp_path: Path):
    """`chorus serve` as a user starts it: the Wyoming listener on its port (here from the
    environment, as compose sets it) beside the HTTP API, the API's keys not applying to it."""
    port = free_port()
    models = tmp_path / "models"
    models.mkdir()
    env = {"CHORUS_WYOMING_PORT": str(port), "CHORUS_API_KEYS": "sesame"}
    with chorus_server(models, tmp_path / "serve.log", CONFIGS, env=env) as running:
        assert httpx.get(f"{running.url}/v1/models", timeout=30).status_code == 401
        info = Info.from_event((await answer(port, [Describe()], until="info"))[0])
        events = await answer(port, [Synthesize(text=SHORT_TEXT, voice=SynthesizeVoice(name=JOE))])
        log = running.output()
    voices = {voice.name: voice for voice in info.tts[0].voices}
    # Every config that speaks text is listed (MusicGen's prompts are no voice); Piper is installed here.
    assert voices[JOE].installed and not any(name.startswith("musicgen") for name in voices)
    assert {name.partition(":")[0] for name in voices} == {"tts-1", "bark", "kokoro", "parler-tts",
                                                           "cloned-voice", "xtts_v2"}
    assert_speech(speech(events), SHORT_SECONDS)
    assert "CHORUS_API_KEYS does not apply to the Wyoming listener" in log


def test_zeroconf_without_a_wyoming_port_is_refused(tmp_path):
    import subprocess

    from tests.processes import REPO, chorus_command

    result = subprocess.run(chorus_command("serve", "--models", str(tmp_path), "--wyoming-zeroconf"),
                            env={**os.environ, "PORT": "0"}, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "--wyoming-zeroconf announces the Wyoming server: give --wyoming-port too" in result.stderr
