"""ElevenLabs' streaming WebSockets: text in as it is written (an LLM's tokens), audio and
character timings out. `stream-input` carries one stream of text; `multi-stream-input` carries
several, each a context named by `context_id`, and closing one mid-sentence stops its speech at
once (an agent's barge-in) without touching the others.

Each context speaks its text through the one path every route uses (SpeechService), one job per
flushed stretch of text, so a context waiting for its next words holds no model's place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketState

from router.alignment import CharTimes, timed_segments
from router.api.common import validation_problem
from router.api.elevenlabs import (
    TextToSpeechBody,
    VoiceSettings,
    parse_output_format,
    prepare,
    voice_not_found,
)
from router.auth import key_matches, presented_keys
from router.chunking import FLUSH
from router.encoding import AudioFormat, StreamEncoder
from router.errors import ChorusError, VoiceNotFound
from router.speech import SpeechJob, SpeechService, check_text

log = logging.getLogger("chorus")
router = APIRouter()

#: ElevenLabs' close code for every refusal (policy violation); 1000 ends a socket normally.
POLICY_VIOLATION = 1008
#: ElevenLabs' default `chunk_length_schedule`: characters buffered before each generation.
DEFAULT_SCHEDULE = (120, 160, 250, 290)
# Where buffered text may be cut for a generation: after a sentence's or a clause's mark.
_BOUNDARY = re.compile(r"[.!?…。！？,;:，；：—][\"'”’)\]]*\s")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*\s")
#: Ends the job a context is speaking (after a flush), and, as None, the context.
_JOB_END = object()
#: The most audio one message carries, before base64: a longer stretch goes in several messages.
#: Modal's web endpoints carry no message over 2 MiB; this keeps every one near 1 MiB.
MAX_MESSAGE_AUDIO = 768 * 1024


class SocketOptions(BaseModel):
    """The query string of both sockets."""

    model_config = ConfigDict(extra="ignore")

    model_id: str | None = None
    output_format: str = "mp3_44100_128"
    language_code: str | None = None
    # ElevenLabs' default and largest value, in seconds.
    inactivity_timeout: float = Field(20, gt=0, le=180)
    sync_alignment: bool = False
    auto_mode: bool = False
    enable_logging: bool = True
    enable_ssml_parsing: bool = False
    apply_text_normalization: str = "auto"
    seed: int | None = Field(None, ge=0, le=4294967295)
    authorization: str | None = None


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    chunk_length_schedule: list[int] = Field(default_factory=lambda: list(DEFAULT_SCHEDULE), min_length=1)


class ClientMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    text: str | None = None
    context_id: str | None = Field(None, min_length=1, max_length=256)
    flush: bool = False
    try_trigger_generation: bool = False
    close_context: bool = False
    close_socket: bool = False
    voice_settings: VoiceSettings | None = None
    generation_config: GenerationConfig | None = None
    xi_api_key: str | None = Field(None, alias="xi-api-key")
    xi_api_key_underscored: str | None = Field(None, alias="xi_api_key")
    authorization: str | None = None

    def key(self) -> str | None:
        return self.xi_api_key or self.xi_api_key_underscored or self.authorization


class SocketError(Exception):
    """A refusal sent as ElevenLabs' error message; `fatal` ones close the socket (1008)."""

    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


@dataclass
class Context:
    """One stream of text and the speech made of it."""

    id: str | None
    schedule: list[int]
    speed: float = 1.0
    #: Text received and not yet given to synthesis.
    buffer: str = ""
    #: Text for synthesis (str), cut marks (FLUSH), job ends (_JOB_END), the end (None).
    released: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    generations: int = 0
    _job_chars: int = 0
    #: The client ended its text with an empty flush: closing lets the speech finish.
    flushed: bool = False
    #: No more text will come.
    closing: bool = False
    speaker: asyncio.Task[None] | None = None
    #: Spaces that ended a job, timed with the next message.
    spaces: list[str] = field(default_factory=list)
    #: The context's one audio stream: every job's audio goes through it, so a client decodes
    #: one file (one MP3 stream, one Ogg stream) however many times the text was flushed.
    encoder: StreamEncoder | None = None
    #: A job is being spoken: the socket is not idle, whatever the client last sent.
    speaking: bool = False

    def add(self, text: str, auto_mode: bool, limit: int) -> None:
        self.flushed = False
        self.buffer += text
        if auto_mode:
            # Cut at each sentence's end (the chunker does), nothing held back.
            self._release(len(self.buffer), limit)
            return
        while True:
            threshold = self.schedule[min(self.generations, len(self.schedule) - 1)]
            if len(self.buffer) < min(threshold, limit):
                break
            cut = max((m.end() for m in _BOUNDARY.finditer(self.buffer) if threshold <= m.end() <= limit), default=0)
            if not cut and len(self.buffer) >= limit:
                # No boundary at all in a long stretch: a space will do, else all of it.
                cut = self.buffer.rfind(" ", 0, limit) + 1 or limit
            if not cut:
                break
            self._release(cut, limit, mark=True)
            self.generations += 1

    def flush(self, ends: bool, limit: int) -> None:
        self._release(len(self.buffer), limit, mark=True)
        self._end_job()
        self.flushed = ends

    def end(self, limit: int) -> None:
        self._release(len(self.buffer), limit, mark=True)
        self.closing = True
        self.released.put_nowait(None)

    def _release(self, end: int, limit: int, mark: bool = False) -> None:
        text, self.buffer = self.buffer[:end], self.buffer[end:]
        if not self._job_chars and not text.strip():
            return  # spaces before a job's first word (the opening " ") say nothing
        if self._job_chars + len(text) > limit:
            # One job stays within the input limit; a long stream is spoken as several.
            self.released.put_nowait(FLUSH)
            self._end_job()
        if text:
            self.released.put_nowait(text)
            self._job_chars += len(text)
        if mark and self._job_chars:
            self.released.put_nowait(FLUSH)

    def _end_job(self) -> None:
        if self._job_chars:
            self.released.put_nowait(_JOB_END)
        self._job_chars = 0

    async def next_job(self) -> AsyncIterator[object] | None:
        """The text of the next job, as it is released; None once the context has ended."""
        while (first := await self.released.get()) in (FLUSH, _JOB_END):
            pass  # a flush with nothing before it
        if first is None:
            self.released.put_nowait(None)
            return None

        async def pieces() -> AsyncIterator[object]:
            item = first
            while item is not _JOB_END:
                if item is None:
                    self.released.put_nowait(None)  # the context ends after this job
                    return
                yield item
                item = await self.released.get()

        return pieces()


class Socket:
    """One client's socket: its contexts, and every message sent to it."""

    def __init__(self, websocket: WebSocket, service: SpeechService, voice_id: str,
                 options: SocketOptions, fmt: AudioFormat, multi: bool):
        self.websocket, self.service, self.voice_id = websocket, service, voice_id
        self.options, self.fmt, self.multi = options, fmt, multi
        self.contexts: dict[str | None, Context] = {}
        self._send_lock = asyncio.Lock()
        self._authorized = not service.settings.api_keys
        self._last_active = asyncio.get_running_loop().time()

    async def send(self, message: dict[str, Any]) -> None:
        """Sends `message` while the socket is open; a client that has left gets nothing (its
        contexts are stopped by the reader, which sees it leave)."""
        async with self._send_lock:
            if self.websocket.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
                    await self.websocket.send_json(message)

    async def error(self, code: str, message: str, context: Context | None = None) -> None:
        payload: dict[str, Any] = {"message": message, "error": code, "code": POLICY_VIOLATION}
        if context is not None and context.id is not None:
            payload["contextId"] = context.id
        await self.send(payload)

    def authorize(self, presented: list[bytes]) -> None:
        keys = [key.encode() for key in self.service.settings.api_keys]
        self._authorized = self._authorized or key_matches(presented, keys)

    async def run(self) -> None:
        """Read the client's messages until it closes, ends, or idles past inactivity_timeout."""
        first = True
        while True:
            raw = await self._receive()
            try:
                if raw is None:
                    raise SocketError("invalid_message", "messages are JSON text; a binary frame is not one")
                try:
                    # The standard library's parser, as the HTTP routes': it takes half of a
                    # surrogate pair, which the text's own check then names.
                    parsed = json.loads(raw)
                except ValueError:
                    raise SocketError("invalid_message", "the message is not valid JSON") from None
                message = ClientMessage.model_validate(parsed)
            except (ValidationError, SocketError) as exc:
                problem = exc.message if isinstance(exc, SocketError) else _message_problem(exc)
                if first:
                    raise SocketError("invalid_message", problem, fatal=True) from None
                await self.error("invalid_message", problem)
                continue
            if first:
                if message.key():
                    self.authorize([message.key().removeprefix("Bearer ").strip().encode()])
                if not self._authorized:
                    raise SocketError("invalid_api_key", "invalid API key: send it in the xi-api-key header, the "
                                      "authorization query parameter or the first message", fatal=True)
                first = False
            self.active()
            if await self.handle(message):
                return

    async def _receive(self) -> str | None:
        """The client's next text message (None for a binary frame). The socket is idle while no
        message comes and no context is speaking: past inactivity_timeout of that, it closes."""
        receiving = asyncio.ensure_future(self.websocket.receive())
        try:
            while not receiving.done():
                await asyncio.wait({receiving}, timeout=self._idle_left())
                if not receiving.done() and self._idle_left() == 0:
                    seconds = self.options.inactivity_timeout
                    raise SocketError("input_timeout_exceeded", f"Have not received a new text input within the "
                                      f"timeout of {seconds:g} seconds. Streaming input terminated.", fatal=True)
        finally:
            receiving.cancel()
        message = receiving.result()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message.get("text")

    def active(self) -> None:
        """The client spoke, or a context's speech went on: the idle time starts again."""
        self._last_active = asyncio.get_running_loop().time()

    def _idle_left(self) -> float:
        """Seconds until the socket counts as idle. It is not idle while it waits on its own
        speech (a context speaking, or every context closing with its whole text given): then
        the whole timeout, after which it looks again."""
        timeout = self.options.inactivity_timeout
        contexts = self.contexts.values()
        if any(context.speaking for context in contexts) or (contexts and all(c.closing for c in contexts)):
            return timeout
        return max(timeout - (asyncio.get_running_loop().time() - self._last_active), 0)

    async def handle(self, message: ClientMessage) -> bool:
        """Act on one message; True when the socket is to close."""
        if message.close_socket:
            # The client is done with every context: what is still being made is not heard.
            for context in list(self.contexts.values()):
                await self.interrupt(context)
            return True
        key = message.context_id if self.multi else None
        if self.multi and key is None:
            if message.text == "":
                return False  # a keep-alive before any context
            await self.error("invalid_message", "every message on multi-stream-input needs a context_id")
            return False
        context = self.contexts.get(key)
        if message.close_context:
            if context is None:
                await self.error("context_not_found", f"there is no open context '{key}'")
            else:
                await self.close_context(context)
            return False
        if context is None:
            if len(self.contexts) >= self.service.settings.websocket_max_contexts:
                await self.error("max_active_conversations",
                                 f"Maximum simultaneous contexts per WebSocket connection exceeded "
                                 f"({self.service.settings.websocket_max_contexts}). Please close an "
                                 "existing context before opening a new one.")
                return False
            context = self.open(key, message)
        elif context.closing:
            await self.error("context_closing", f"context '{key}' is closing; open another", context)
            return False
        text = message.text
        limit = self._limit()
        if text == "" and not message.flush:
            if self.multi:
                return False  # a keep-alive
            context.end(limit)  # stream-input: the end of the text
            await self.finish_all()
            return True
        try:
            if text:
                check_text(text, limit, "text")
        except ChorusError as exc:
            await self.error(exc.code, exc.message, context)
        else:
            if text:
                context.add(text, self.options.auto_mode, limit)
        if message.flush:
            context.flush(not text, limit)
        return False

    def open(self, key: str | None, message: ClientMessage) -> Context:
        schedule = (message.generation_config or GenerationConfig()).chunk_length_schedule
        context = Context(key, schedule, speed=(message.voice_settings.speed if message.voice_settings else None) or 1.0)
        self.contexts[key] = context
        context.speaker = asyncio.create_task(self.speak(context))
        return context

    def _limit(self) -> int:
        return self.service.settings.input_limit("elevenlabs")

    async def close_context(self, context: Context) -> None:
        """The client's `close_context`. After an empty flush (the whole reply given) the speech
        finishes; otherwise, or on a context already finishing, it is a barge-in: the speech
        stops now, mid-sentence, and what is buffered is dropped (ElevenLabs: closing a context
        whose audio is still being made interrupts it)."""
        if context.flushed and not context.closing:
            context.end(self._limit())
            return
        await self.interrupt(context)

    async def interrupt(self, context: Context) -> None:
        assert context.speaker is not None
        context.speaker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await context.speaker
        if self.contexts.pop(context.id, None) is not None:
            await self.send(self._final(context))

    async def finish_all(self) -> None:
        speakers = [context.speaker for context in self.contexts.values() if context.speaker is not None]
        await asyncio.gather(*speakers, return_exceptions=True)

    def _final(self, context: Context) -> dict[str, Any]:
        return {"isFinal": True, "contextId": context.id} if self.multi else {"isFinal": True}

    async def speak(self, context: Context) -> None:
        """Each of the context's jobs in turn; then the end of its audio and its final message."""
        try:
            while (pieces := await context.next_job()) is not None:
                context.speaking = True
                try:
                    await self._speak_job(context, pieces)
                finally:
                    context.speaking = False
                    self.active()
            if context.encoder is not None:
                tail = await to_thread.run_sync(context.encoder.finish)
                if tail:
                    await self._send_audio(context, tail, None)
        except Exception as exc:
            if not isinstance(exc, ChorusError):
                log.exception("a WebSocket context failed")
            code, message = (exc.code, exc.message) if isinstance(exc, ChorusError) else ("internal_error", "internal server error")
            self.contexts.pop(context.id, None)
            await self.error(code, message, context)
            # The voice is the socket's own (its path): no context of it could speak.
            if not self.multi or code == "voice_not_found":
                await _close(self.websocket, POLICY_VIOLATION)
            return
        self.contexts.pop(context.id, None)
        await self.send(self._final(context))

    async def _speak_job(self, context: Context, pieces: AsyncIterator[object]) -> None:
        body = TextToSpeechBody(text="", model_id=self.options.model_id, language_code=self.options.language_code,
                                voice_settings=VoiceSettings(speed=context.speed), seed=self.options.seed)
        job = prepare(self.service, self.voice_id, body, pieces=pieces)
        job.request = job.request.model_copy(update={"word_times": True})
        async with voice_not_found(self.voice_id):
            timed = await self.service.timed(job)
            if context.encoder is None:
                context.encoder = StreamEncoder(self.fmt, timed.sample_rate)
            segments = timed_segments(timed, context.encoder, whole_chunks=self.options.sync_alignment)
            async with aclosing(segments):
                async for segment in segments:
                    times = segment.alignment
                    if not segment.audio and (not times or times.ends[-1] == times.starts[0]):
                        # Only the spaces after a job's last word: no sound to time them to, and
                        # clients take a word's end from the next message's times. They open
                        # the context's next message instead.
                        if times:
                            context.spaces += times.characters
                        continue
                    if times and context.spaces:
                        origin = times.starts[0]
                        spaces = CharTimes(context.spaces, [origin] * len(context.spaces), [origin] * len(context.spaces))
                        spaces.extend(times)
                        times, context.spaces = spaces, []
                    await self._send_audio(context, segment.audio, _alignment_ms(times))

    async def _send_audio(self, context: Context, audio: bytes, alignment: dict[str, list] | None) -> None:
        """`audio` in messages of at most MAX_MESSAGE_AUDIO (whole samples), the characters heard
        in it with the last."""
        parts = [audio[at:at + MAX_MESSAGE_AUDIO] for at in range(0, len(audio), MAX_MESSAGE_AUDIO)] or [b""]
        for number, part in enumerate(parts, 1):
            last = number == len(parts)
            message: dict[str, Any] = {
                "audio": base64.b64encode(part).decode() if part else None,
                "isFinal": None,
                "normalizedAlignment": alignment if last else None,
                "alignment": alignment if last else None,
            }
            if self.multi:
                message["contextId"] = context.id
            await self.send(message)

    async def cancel_all(self) -> None:
        for context in self.contexts.values():
            if context.speaker is not None:
                context.speaker.cancel()
        await self.finish_all()


def _alignment_ms(times: CharTimes | None) -> dict[str, list] | None:
    """ElevenLabs' socket alignment: whole milliseconds from the start of the text chunk the
    characters belong to, whose durations add up to its audio's length."""
    if not times:
        return None
    origin = times.starts[0]
    starts = [round((start - origin) * 1000) for start in times.starts]
    ends = [round((end - origin) * 1000) for end in times.ends]
    return {"chars": times.characters, "charStartTimesMs": starts,
            "charDurationsMs": [end - start for start, end in zip(starts, ends, strict=True)]}


def _message_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return "the message is not valid JSON"
    if error["type"] == "model_type":
        return "the message must be a JSON object"
    return validation_problem(exc)[0]


async def _serve(websocket: WebSocket, voice_id: str, multi: bool) -> None:
    state = websocket.app.state
    service: SpeechService = state.speech
    await websocket.accept()
    if getattr(state, "open_sockets", 0) >= service.settings.websocket_max_sockets:
        await _refuse(websocket, "max_sockets_exceeded",
                      f"this server has {service.settings.websocket_max_sockets} sockets open, its limit")
        return
    state.open_sockets = getattr(state, "open_sockets", 0) + 1
    try:
        ending = await _converse(websocket, service, voice_id, multi)
    finally:
        # Given back before the close frame goes out: a client that has seen its socket close
        # may open another at once, even at the limit.
        state.open_sockets -= 1
    if isinstance(ending, SocketError):
        await _refuse(websocket, ending.code, ending.message)
    elif ending is not None:
        await _close(websocket, ending)


async def _converse(websocket: WebSocket, service: SpeechService, voice_id: str, multi: bool) -> int | SocketError | None:
    """One socket's conversation, its speech stopped at the end; returns how the socket is to
    close: a close code, a refusal to send first, or None where there is nothing to send (the
    client left, or a failed stream-input closed it already)."""
    socket: Socket | None = None
    try:
        try:
            options = SocketOptions.model_validate(dict(websocket.query_params))
        except ValidationError as exc:
            raise SocketError("invalid_request", validation_problem(exc)[0], fatal=True) from None
        try:
            fmt = parse_output_format(options.output_format)
            # The model and the voice are checked now, before any text is waited for, as
            # ElevenLabs does.
            body = TextToSpeechBody(text="", model_id=options.model_id, language_code=options.language_code)
            async with voice_not_found(voice_id):
                job = prepare(service, voice_id, body, pieces=_nothing())
            await _check_voice(service, job, voice_id)
        except ChorusError as exc:
            raise SocketError(exc.code, exc.message, fatal=True) from None
        socket = Socket(websocket, service, voice_id, options, fmt, multi)
        presented = presented_keys({k.lower(): v for k, v in websocket.headers.raw})
        if options.authorization:
            presented.append(options.authorization.removeprefix("Bearer ").strip().encode())
        socket.authorize(presented)
        limit = service.settings.websocket_max_seconds
        try:
            async with asyncio.timeout(limit):
                await socket.run()
        except TimeoutError:
            raise SocketError("max_duration_exceeded", f"This connection reached the server's limit of "
                              f"{limit:g} seconds per socket; open a new one to go on.", fatal=True) from None
        return 1000
    except SocketError as exc:
        return exc
    except (WebSocketDisconnect, RuntimeError):
        return None  # the client left, or a failed stream-input closed the socket
    finally:
        if socket is not None:
            await socket.cancel_all()


#: A voice that is a plain name, not a weighted mix, a description or a path to clone from.
_PLAIN_VOICE = re.compile(r"^[\w.-]+$")


async def _check_voice(service: SpeechService, job: SpeechJob, voice_id: str) -> None:
    """Refuses a voice the model's backend does not list, where it lists its voices (it ran)
    and the voice is a plain name: other kinds (a mix, a description) only synthesis can judge."""
    voice = job.request.voice
    if voice is None or not _PLAIN_VOICE.match(voice):
        return
    try:
        names = await service.runner.voices(job.config)
    except ChorusError:
        return  # the backend cannot be asked now: the first text will say
    if names is not None and voice not in names:
        raise VoiceNotFound(f"A voice with the voice_id {voice_id} was not found. Model "
                            f"'{job.config.name}' has {', '.join(names)}.", param="voice_id")


async def _refuse(websocket: WebSocket, code: str, message: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        if websocket.application_state == WebSocketState.CONNECTED:
            await websocket.send_json({"message": message, "error": code, "code": POLICY_VIOLATION})
    await _close(websocket, POLICY_VIOLATION)


async def _close(websocket: WebSocket, code: int) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        if websocket.application_state == WebSocketState.CONNECTED:
            await websocket.close(code)


async def _nothing() -> AsyncIterator[object]:
    return
    yield


@router.websocket("/v1/text-to-speech/{voice_id:voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await _serve(websocket, voice_id, multi=False)


@router.websocket("/v1/text-to-speech/{voice_id:voice_id}/multi-stream-input")
async def multi_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await _serve(websocket, voice_id, multi=True)
