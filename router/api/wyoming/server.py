"""Home Assistant's Wyoming protocol: every model's voices over TCP (`chorus serve --wyoming-port`).

Events in, speech out, through the one path every front door uses (SpeechService): `describe`
answers `info`, `synthesize` (one text) and `synthesize-start`/`-chunk`/`-stop` (text as an LLM
writes it) answer `audio-start`, `audio-chunk`s of 16-bit mono PCM and `audio-stop`, the first
chunk after the first sentence. The `wyoming` package frames and parses the events.

One TTS program lists every voice: Home Assistant's Wyoming integration shows only the first
installed program of a server, so a program per model would hide all models but one. A voice is
one (model, backend voice) pair, named `model:voice`; model names never hold a colon, so the
name splits one way only (a voice may hold anything, Bark's `v2/en_speaker_6` included).

Every refusal is an `error` event, and the connection closes after it: Home Assistant reads a
synthesis until `audio-stop` or `synthesize-stopped` and nothing else ends its wait. The listener
has no authentication (CHORUS_API_KEYS does not reach it): serve it on the LAN only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from functions import PROMPT_BACKENDS
from router.chunking import Fragments
from router.errors import (
    ChorusError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    SynthesisFailed,
    VoiceNotFound,
)
from router.speech import Ask, SpeechService, model_voices
from router.voices import Caller

log = logging.getLogger("chorus")

#: Between a voice's model and its backend voice, in a Wyoming voice name.
VOICE_SEPARATOR = ":"
#: PCM per audio-chunk event: 1024 samples, as wyoming-piper sends them.
CHUNK_BYTES = 2048
#: Seconds a frame's data and payload may take to arrive after its header line: a length that
#: promises more than is sent must not hold a connection (and its reader) forever.
FRAME_SECONDS = 10.0
#: Seconds a refused connection is read (and dropped) after the error event, until the client
#: closes too: closing with its bytes unread would reset the connection, and a reset can reach
#: the client before it has read the error.
LINGER_SECONDS = 5.0
SERVICE_TYPE = "_wyoming._tcp.local."
#: Who made each backend's voices, for Home Assistant's voice list.
ATTRIBUTIONS = {
    "piper": Attribution(name="Open Home Foundation", url="https://github.com/OHF-Voice/piper1-gpl"),
    "coqui": Attribution(name="Coqui (Idiap fork)", url="https://github.com/idiap/coqui-ai-TTS"),
    "bark": Attribution(name="Suno", url="https://github.com/suno-ai/bark"),
    "parler-tts": Attribution(name="Hugging Face", url="https://github.com/huggingface/parler-tts"),
    "vall-e-x": Attribution(name="Plachtaa", url="https://github.com/Plachtaa/VALL-E-X"),
}
_CHORUS = Attribution(name="Chorus", url="")


class MalformedEvent(InvalidRequest):
    code = "malformed_event"


async def describe(service: SpeechService) -> Info:
    """One program, one voice per (model, backend voice) of every model that speaks text. A
    model whose backend cannot be reached lists its config's voices as not installed."""
    # Wyoming carries no key: the saved voices made on a server without keys.
    keyless = service.voices.all(Caller())
    listing = await model_voices(service, keyless)
    saved = {voice.id: voice.name for voice in keyless}
    voices = []
    for config in service.registry.all():
        served = listing.get(config.name)  # None: a config-less model first served since the listing
        if served is None or config.backend in PROMPT_BACKENDS:
            continue  # a prompt describes a sound: no voice to read a reply with
        # Without a language Home Assistant, which lists voices per language, offers none.
        languages = [config.parameters.language] if config.parameters.language else []
        # A model with no voice names of its own (Parler-TTS) is one voice: its default.
        for voice in served.names or [None]:
            voices.append(TtsVoice(
                name=f"{config.name}{VOICE_SEPARATOR}{voice}" if voice else config.name,
                description=f"{saved.get(voice, voice)} ({config.name}, {config.backend})" if voice
                else f"{config.name} ({config.backend})",
                attribution=ATTRIBUTIONS.get(config.backend, _CHORUS),
                installed=served.confirmed,
                version=None,
                languages=languages,
            ))
    program = TtsProgram(
        name="chorus", description="Chorus: every model's voices", attribution=_CHORUS, installed=True,
        version=None, voices=voices, supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


async def _model_voice(service: SpeechService, name: str) -> tuple[str, str | None]:
    """The (model, backend voice) a Wyoming voice name picks: `model:voice`, a model alone (its
    own voice), or a bare backend voice (wyoming-piper's names), served by the first model that
    lists it."""
    model, separator, voice = name.partition(VOICE_SEPARATOR)
    if separator:
        return model, voice
    with contextlib.suppress(ModelNotFound):
        return service.registry.get(name).name, None
    for model, voices in (await model_voices(service, service.voices.all(Caller()))).items():
        if name in voices.names:
            return model, name
    raise VoiceNotFound(f"voice '{name}' is not served here; describe lists every voice (model{VOICE_SEPARATOR}voice)",
                        param="voice")


async def _language_voice(service: SpeechService, language: str) -> str:
    """The first installed voice that speaks `language` (its primary subtag: en_US finds en)."""
    wanted = _primary(language)
    for voice in (await describe(service)).tts[0].voices:
        if voice.installed and any(_primary(spoken) == wanted for spoken in voice.languages):
            return voice.name
    raise VoiceNotFound(f"no voice served here speaks language '{language}'", param="voice")


def _primary(language: str) -> str:
    return language.replace("_", "-").split("-")[0].lower()


@asynccontextmanager
async def _voice_errors(name: str | None) -> AsyncIterator[None]:
    """An unknown model, or a voice its backend does not offer, is an unknown Wyoming voice."""
    try:
        yield
    except ModelNotFound as exc:
        if name is None:
            raise  # no voice asked for, and no model configured
        raise VoiceNotFound(f"voice '{name}' is not served here: {exc.message}", param="voice") from exc
    except InvalidRequest as exc:
        if exc.param != "voice":
            raise
        raise VoiceNotFound(exc.message, param="voice") from exc


class _Frames:
    """The connection's bytes as wyoming's event reader takes them, within bounds: a header line
    longer than the stream's limit, or a data or payload length over `max_bytes`, is refused
    before anything is allocated for it; and the rest of a frame must follow its header line
    within FRAME_SECONDS. `problem` says which bound a refused frame broke."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int):
        self._reader, self._max_bytes = reader, max_bytes
        self.problem: str | None = None

    async def readline(self) -> bytes:
        try:
            return await self._reader.readline()
        except ValueError:
            self.problem = f"an event's header line is longer than {self._max_bytes} bytes"
            raise

    async def readexactly(self, size: int) -> bytes:
        if size > self._max_bytes:
            self.problem = f"an event announces {size} bytes of data or payload; the limit is {self._max_bytes}"
            raise ValueError(self.problem)
        try:
            return await asyncio.wait_for(self._reader.readexactly(size), FRAME_SECONDS)
        except TimeoutError:
            self.problem = f"an event's data or payload did not arrive within {FRAME_SECONDS:g} s"
            raise ValueError(self.problem) from None


class Connection:
    """One client: its events in, its speech out, one synthesis after another in the order asked."""

    def __init__(self, service: SpeechService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.service, self._reader, self._writer = service, reader, writer
        self._frames = _Frames(reader, service.settings.max_body_bytes)
        #: The synthesis asked last (each waits for the one before it).
        self._speech: asyncio.Task[None] | None = None
        #: The text of the open synthesize-start stream, None at its end.
        self._stream: asyncio.Queue[str | None] | None = None

    async def serve(self) -> None:
        try:
            while (event := await self._next_event()) is not None:
                await self.handle(event)
        except ChorusError as exc:
            await self.refuse(exc)
        except ConnectionError:
            pass  # the client left mid-answer
        except Exception:
            log.exception("a Wyoming connection failed")
            await self.refuse(SynthesisFailed("internal server error"))
        finally:
            # A client that leaves stops its speech now, as one whose HTTP response is dropped.
            if self._speech is not None:
                self._speech.cancel()
                await asyncio.wait([self._speech])
            self._writer.close()

    async def _next_event(self) -> Event | None:
        """The next event; None once the client has closed. Raises MalformedEvent for a frame
        that does not parse or breaks a bound."""
        # Idle is no event and no speech: a client still hearing its answer is not idle.
        speaking = self._speech is not None and not self._speech.done()
        idle = None if speaking else self.service.settings.wyoming_idle_timeout
        try:
            event = await asyncio.wait_for(async_read_event(self._frames), idle)  # type: ignore[arg-type]
        except asyncio.IncompleteReadError:
            return None  # closed mid-frame
        except TimeoutError:
            log.info("a Wyoming connection sent nothing for %g s: closed", idle)
            return None
        except Exception as exc:  # JSON that is no object, a length that is no number, no type...
            raise MalformedEvent(f"malformed event ({type(exc).__name__}: {exc})") from None
        if event is None and (self._frames.problem or not self._reader.at_eof()):
            raise MalformedEvent(self._frames.problem or "malformed event: it is not the JSON a Wyoming event is")
        if event is not None and not (isinstance(event.type, str) and isinstance(event.data, dict)):
            raise MalformedEvent("malformed event: its type must be a string and its data an object")
        return event

    async def handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self.send((await describe(self.service)).event())
        elif Ping.is_type(event.type):
            await self.send(Pong(text=Ping.from_event(event).text).event())
        elif Synthesize.is_type(event.type):
            # In a stream it is the whole text again, sent for servers that cannot stream.
            if self._stream is None:
                synthesize = _parsed(Synthesize, event)
                self._speak(synthesize.voice, text=_text(synthesize.text))
        elif SynthesizeStart.is_type(event.type):
            if self._stream is not None:
                raise InvalidRequest("a text stream is already open: end it with synthesize-stop first")
            self._stream = asyncio.Queue()
            self._speak(_parsed(SynthesizeStart, event).voice, _until_end(self._stream))
        elif SynthesizeChunk.is_type(event.type):
            self._open_stream().put_nowait(_text(_parsed(SynthesizeChunk, event).text))
        elif SynthesizeStop.is_type(event.type):
            self._open_stream().put_nowait(None)
            self._stream = None
        # Any other event is not for a TTS server; Wyoming peers ignore what they do not handle.

    def _open_stream(self) -> asyncio.Queue[str | None]:
        if self._stream is None:
            raise InvalidRequest("no text stream is open: send synthesize-start first")
        return self._stream

    def _speak(self, voice: SynthesizeVoice | None, text: str | Fragments) -> None:
        self._speech = asyncio.create_task(self._synthesis(self._speech, voice, text))

    async def _synthesis(self, before: asyncio.Task[None] | None, voice: SynthesizeVoice | None,
                         text: str | Fragments) -> None:
        if before is not None:
            await asyncio.wait([before])
            if self._writer.is_closing():
                return  # it failed, and the connection with it
        try:
            name = voice.name if voice is not None else None
            async with _voice_errors(name):
                model, backend_voice, language = await self._choice(voice)
                job = self.service.prepare(Ask(text=text, text_param="text", model=model, family="wyoming",
                                               voice=backend_voice, language=language))
                synthesis = await self.service.synthesis(job)
            async with aclosing(synthesis):
                started = False
                async for step in synthesis:
                    if not step.pcm:
                        continue
                    if not started:
                        await self.send(AudioStart(rate=synthesis.sample_rate, width=2, channels=1).event())
                        started = True
                    await self._send_pcm(synthesis.sample_rate, step.pcm)
                if not started:
                    raise synthesis.no_audio()
                await self.send(AudioStop().event())
            if not isinstance(text, str):
                await self.send(SynthesizeStopped().event())
        except ChorusError as exc:
            await self.refuse(exc)
        except ConnectionError:
            self._writer.close()  # the client left
        except Exception:
            log.exception("a Wyoming synthesis failed")
            await self.refuse(SynthesisFailed("internal server error"))

    async def _choice(self, voice: SynthesizeVoice | None) -> tuple[str | None, str | None, str | None]:
        """(model, backend voice, language) a Wyoming voice asks for; all None: the default
        model's own voice. A `speaker` is a backend voice of the model the name picks."""
        if voice is None or (voice.name is None and voice.language is None):
            return None, None, None
        name = voice.name or await _language_voice(self.service, voice.language)
        model, backend_voice = await _model_voice(self.service, name)
        return model, voice.speaker or backend_voice, voice.language

    async def _send_pcm(self, rate: int, pcm: bytes) -> None:
        for start in range(0, len(pcm), CHUNK_BYTES):
            await self.send(AudioChunk(rate=rate, width=2, channels=1, audio=pcm[start:start + CHUNK_BYTES]).event())

    async def send(self, event: Event) -> None:
        await async_write_event(event, self._writer)

    async def refuse(self, exc: ChorusError) -> None:
        """The error event, then the end of the connection (see the module's docstring)."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.send(Error(text=exc.message, code=exc.code).event())
            self._writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                while await self._reader.read(CHUNK_BYTES):
                    pass
        self._writer.close()


def _parsed(kind: type, event: Event):
    try:
        return kind.from_event(event)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise InvalidRequest(f"{event.type}: its data is not what the Wyoming protocol says it holds") from None


def _text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidRequest("'text' must be a string", param="text")
    return text


async def _until_end(stream: asyncio.Queue[str | None]) -> AsyncIterator[object]:
    while (text := await stream.get()) is not None:
        yield text


class Advertisement:
    """The server announced by mDNS as `<name>._wyoming._tcp.local.`, the way Home Assistant
    discovers Wyoming services (python-zeroconf)."""

    def __init__(self, name: str, host: str, port: int):
        self.name, self.host, self.port = name, host, port
        self._zeroconf = None
        self._info = None

    async def start(self) -> None:
        """Announce; where this host cannot (no route, no multicast) say so and serve on: Home
        Assistant can still be given the host and port by hand."""
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        try:
            address = _advertised_address(self.host)
            if ipaddress.ip_address(address).is_loopback:
                log.warning("zeroconf announces the Wyoming server at %s, which only this machine can reach; "
                            "serve it with --host 0.0.0.0 (or the LAN address) for Home Assistant", address)
            # A host name of its own (RFC 6763's SRV target): answered with the instance's name, the
            # address could precede the SRV in a reply, and python-zeroconf's browser then drops it.
            host = (re.sub(r"[^a-z0-9-]+", "-", self.name.lower()).strip("-") or "chorus") + ".local."
            info = AsyncServiceInfo(SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}", parsed_addresses=[address],
                                    port=self.port, server=host)
            # On the interface the server is reached by, not on every one (docker's bridges).
            zeroconf = AsyncZeroconf(interfaces=[address])
            # Another server already announced under the name: take "name (2)" rather than fail.
            await zeroconf.async_register_service(info, allow_name_change=True)
        except OSError as exc:
            log.warning("zeroconf: cannot announce the Wyoming server (%s); add it in Home Assistant by "
                        "host and port", exc)
            return
        self._zeroconf, self._info = zeroconf, info
        log.info("zeroconf: announced %s at %s:%d", info.name, address, self.port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_service(self._info)
            await self._zeroconf.async_close()
            self._zeroconf = None


def _advertised_address(host: str) -> str:
    """`host`'s address, or for a wildcard the address this machine reaches the LAN from (the
    route to the mDNS group; connecting a UDP socket sends nothing). Raises OSError."""
    if host not in ("", "0.0.0.0", "::"):
        return socket.getaddrinfo(host, None)[0][4][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return probe.getsockname()[0]


class WyomingServer:
    """The Wyoming listener on the settings' host and `wyoming_port`, on the running event loop
    (the HTTP server's, so both share one SpeechService); announced by zeroconf when
    `wyoming_zeroconf` names it."""

    def __init__(self, service: SpeechService):
        self.service = service
        settings = service.settings
        self.host, self.port = settings.host, settings.wyoming_port or 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._advertisement: Advertisement | None = None

    async def start(self) -> None:
        # The stream's limit bounds a header line: one event is never larger than a request body.
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  limit=self.service.settings.max_body_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Wyoming (Home Assistant) on tcp://%s:%d", self.host, self.port)
        if self.service.settings.every_api_key:
            log.warning("CHORUS_API_KEYS does not apply to the Wyoming listener on port %d: it has no "
                        "authentication, so expose it on the LAN only", self.port)
        if self.service.settings.wyoming_zeroconf:
            self._advertisement = Advertisement(self.service.settings.wyoming_zeroconf, self.host, self.port)
            await self._advertisement.start()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(self.service, reader, writer)
        limit = self.service.settings.wyoming_max_connections
        if len(self._connections) >= limit:
            await connection.refuse(Overloaded(f"this server has {limit} Wyoming connections open, its "
                                               "limit: try again when one has closed", retry_after=1))
            return
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await connection.serve()
        finally:
            self._connections.discard(task)

    async def stop(self) -> None:
        if self._advertisement is not None:
            await self._advertisement.stop()
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections))
            await self._server.wait_closed()
