"""ElevenLabs' streaming WebSockets: text in as it is written (an LLM's tokens), audio and
character timings out. `stream-input` carries one stream of text; `multi-stream-input` carries
several, each a context named by `context_id`, and closing one mid-sentence stops its speech at
once (an agent's barge-in) without touching the others.

Each context speaks its text through the one path every route uses (SpeechService), one job per
flushed stretch of text, so a context waiting for its next words holds no model's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from router import text as rules
from router.api.common import validation_problem
from router.api.elevenlabs.schedule import TextSchedule
from router.api.elevenlabs.schemas import (
    ClientMessage,
    GenerationConfig,
    SocketError,
    SocketOptions,
    TextToSpeechBody,
    ask,
    parse_output_format,
    voice_not_found,
)
from router.api.elevenlabs.speaker import Speaker
from router.auth import caller, key_matches, presented_keys
from router.chunking import Fragments
from router.encoding import AudioFormat
from router.errors import ChorusError, VoiceNotFound
from router.speech import SpeechJob, SpeechService
from router.voices import Caller

log = logging.getLogger("chorus")
router = APIRouter()

#: ElevenLabs' close code for every refusal (policy violation); 1000 ends a socket normally.
POLICY_VIOLATION = 1008


class SocketLimit:
    """The ElevenLabs sockets open at once on this server, at most `most`."""

    def __init__(self, most: int):
        self.most, self.open = most, 0


class Socket:
    """One client's socket: its contexts (a Speaker each), what it reads, what it sends."""

    def __init__(self, websocket: WebSocket, service: SpeechService, voice_id: str, caller: Caller,
                 options: SocketOptions, fmt: AudioFormat, multi: bool):
        self.websocket, self.service, self.voice_id, self.caller = websocket, service, voice_id, caller
        self.options, self.fmt, self.multi = options, fmt, multi
        self.contexts: dict[str | None, Speaker] = {}
        self._limit = service.settings.input_limit("elevenlabs")
        self._send_lock = asyncio.Lock()
        self._authorized = not service.settings.every_api_key
        self._last_active = asyncio.get_running_loop().time()

    async def send(self, message: dict[str, Any]) -> None:
        """Sends `message` while the socket is open; a client that has left gets nothing (its
        contexts are stopped by the reader, which sees it leave)."""
        async with self._send_lock:
            if self.websocket.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
                    await self.websocket.send_json(message)

    async def error(self, code: str, message: str, context: Speaker | None = None) -> None:
        payload: dict[str, Any] = {"message": message, "error": code, "code": POLICY_VIOLATION}
        if context is not None and context.id is not None:
            payload["contextId"] = context.id
        await self.send(payload)

    @property
    def authorized(self) -> bool:
        return self._authorized

    async def check_voice(self) -> None:
        """The model and the voice, checked before any text is waited for, as ElevenLabs does;
        a failure closes the socket with ElevenLabs' error."""
        options = self.options
        body = TextToSpeechBody(text="", model_id=options.model_id, language_code=options.language_code)
        try:
            async with voice_not_found(self.voice_id):
                job = self.service.prepare(ask(self.voice_id, body, self.caller, _nothing()))
            await _check_voice(self.service, job, self.voice_id)
        except ChorusError as exc:
            raise SocketError(exc.code, exc.message, fatal=True) from None

    def authorize(self, presented: list[bytes]) -> None:
        keys = [key.encode() for key in self.service.settings.every_api_key]
        self._authorized = self._authorized or key_matches(presented, keys)

    async def run(self) -> None:
        """Read the client's messages until it closes, ends, or idles past inactivity_timeout."""
        first = True
        while True:
            try:
                message = _parsed(await self._receive())
            except SocketError as exc:
                if exc.fatal:
                    raise
                if first:
                    raise SocketError(exc.code, exc.message, fatal=True) from None
                await self.error(exc.code, exc.message)
                continue
            if first:
                checked = self._authorized
                if message.key():
                    presented = [message.key().removeprefix("Bearer ").strip().encode()]
                    self.authorize(presented)
                    if not checked:
                        self.caller = caller(presented, self.service.settings)
                if not self._authorized:
                    raise SocketError("invalid_api_key", "invalid API key: send it in the xi-api-key header, the "
                                      "authorization query parameter or the first message", fatal=True)
                if not checked:
                    await self.check_voice()
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
        if any(c.speaking for c in contexts) or (contexts and all(c.schedule.closing for c in contexts)):
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
            if message.text != "":  # an empty text is a keep-alive before any context
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
            context = await self._open(key, message)
            if context is None:
                return False
        elif context.schedule.closing:
            await self.error("context_closing", f"context '{key}' is closing; open another", context)
            return False
        if message.text == "" and not message.flush:
            if self.multi:
                return False  # a keep-alive
            context.schedule.end()  # stream-input: the end of the text
            await self.finish_all()
            return True
        try:
            if message.text:
                rules.check(message.text, self._limit, "text")
                context.schedule.add(message.text, self.options.auto_mode)
        except ChorusError as exc:
            await self.error(exc.code, exc.message, context)
        if message.flush:
            context.schedule.flush(not message.text)
        return False

    async def _open(self, key: str | None, message: ClientMessage) -> Speaker | None:
        most = self.service.settings.websocket_max_contexts
        if len(self.contexts) >= most:
            await self.error("max_active_conversations", f"Maximum simultaneous contexts per WebSocket connection "
                             f"exceeded ({most}). Please close an existing context before opening a new one.")
            return None
        schedule = TextSchedule((message.generation_config or GenerationConfig()).chunk_length_schedule, self._limit)
        speed = (message.voice_settings.speed if message.voice_settings else None) or 1.0
        context = self.contexts[key] = Speaker(key, schedule, speed, self.service, self.voice_id, self.caller,
                                               self.options, self.fmt, self.send)
        context.start(self.active, self._ended)
        return context

    async def close_context(self, context: Speaker) -> None:
        """The client's `close_context`. After an empty flush (the whole reply given) the speech
        finishes; otherwise, or on a context already finishing, it is a barge-in: the speech
        stops now, mid-sentence, and what is buffered is dropped (ElevenLabs: closing a context
        whose audio is still being made interrupts it)."""
        if context.schedule.flushed and not context.schedule.closing:
            context.schedule.end()
            return
        await self.interrupt(context)

    async def interrupt(self, context: Speaker) -> None:
        await context.stop()
        if self.contexts.pop(context.id, None) is not None:
            await self.send(context.final())

    async def _ended(self, context: Speaker, failure: ChorusError | None) -> None:
        """A context's speech ended: its final message, or its error."""
        self.contexts.pop(context.id, None)
        if failure is None:
            await self.send(context.final())
            return
        await self.error(failure.code, failure.message, context)
        # The voice is the socket's own (its path): no context of it could speak.
        if not self.multi or failure.code == "voice_not_found":
            await _close(self.websocket, POLICY_VIOLATION)

    async def finish_all(self) -> None:
        await asyncio.gather(*(c.task for c in self.contexts.values() if c.task is not None), return_exceptions=True)

    async def cancel_all(self) -> None:
        for context in list(self.contexts.values()):
            await context.stop()


def _parsed(raw: str | None) -> ClientMessage:
    """A client's message, or the SocketError that says what is wrong with it."""
    if raw is None:
        raise SocketError("invalid_message", "messages are JSON text; a binary frame is not one")
    try:
        # The standard library's parser, as the HTTP routes': it takes half of a surrogate pair,
        # which the text rules then name.
        parsed = json.loads(raw)
    except ValueError:
        raise SocketError("invalid_message", "the message is not valid JSON") from None
    try:
        return ClientMessage.model_validate(parsed)
    except ValidationError as exc:
        raise SocketError("invalid_message", _message_problem(exc)) from None


def _message_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return "the message is not valid JSON"
    if error["type"] == "model_type":
        return "the message must be a JSON object"
    return validation_problem(exc)[0]


async def _serve(websocket: WebSocket, voice_id: str, multi: bool) -> None:
    service: SpeechService = websocket.app.state.speech
    sockets: SocketLimit = websocket.app.state.sockets
    await websocket.accept()
    if sockets.open >= sockets.most:
        await _refuse(websocket, "max_sockets_exceeded", f"this server has {sockets.most} sockets open, its limit")
        return
    sockets.open += 1
    try:
        ending = await _converse(websocket, service, voice_id, multi)
    finally:
        # Given back before the close frame goes out: a client that has seen its socket close
        # may open another at once, even at the limit.
        sockets.open -= 1
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
        presented = presented_keys({k.lower(): v for k, v in websocket.headers.raw})
        if options.authorization:
            presented.append(options.authorization.removeprefix("Bearer ").strip().encode())
        try:
            fmt = parse_output_format(options.output_format)
        except ChorusError as exc:
            raise SocketError(exc.code, exc.message, fatal=True) from None
        socket = Socket(websocket, service, voice_id, caller(presented, service.settings), options, fmt, multi)
        socket.authorize(presented)
        if socket.authorized:
            await socket.check_voice()
        # Else the key comes in the first message, and the voice (maybe that key's) once it came.
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


async def _nothing() -> Fragments:
    return
    yield


@router.websocket("/v1/text-to-speech/{voice_id:voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await _serve(websocket, voice_id, multi=False)


@router.websocket("/v1/text-to-speech/{voice_id:voice_id}/multi-stream-input")
async def multi_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await _serve(websocket, voice_id, multi=True)
