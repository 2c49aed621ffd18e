"""One socket context's speech: each job its text schedule releases, spoken through the one path
every front door uses (SpeechService) into the context's one audio stream, and sent as ElevenLabs'
messages: audio with the characters heard in it, then `isFinal`."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from anyio import to_thread

from router.alignment import CharTimes, timed_segments
from router.api.elevenlabs.schedule import TextSchedule
from router.api.elevenlabs.schemas import SocketOptions, TextToSpeechBody, VoiceSettings, ask, voice_not_found
from router.chunking import Fragments
from router.encoding import AudioFormat, StreamEncoder
from router.errors import ChorusError
from router.speech import SpeechService
from router.voices import Caller

log = logging.getLogger("chorus")

#: The most audio one message carries, before base64: a longer stretch goes in several messages.
#: Modal's web endpoints carry no message over 2 MiB; this keeps every one near 1 MiB.
MAX_MESSAGE_AUDIO = 768 * 1024

Send = Callable[[dict[str, Any]], Awaitable[None]]


class Speaker:
    """A context's text schedule and the task that speaks what it releases. `contextId` goes in
    every message where the socket is multi-stream-input (`context_id` not None)."""

    def __init__(self, context_id: str | None, schedule: TextSchedule, speed: float, service: SpeechService,
                 voice_id: str, caller: Caller, options: SocketOptions, fmt: AudioFormat, send: Send):
        self.id, self.schedule, self._speed = context_id, schedule, speed
        self._service, self._voice_id, self._caller = service, voice_id, caller
        self._options, self._fmt, self._send = options, fmt, send
        #: The context's one audio stream: every job's audio goes through it, so a client decodes
        #: one file (one MP3 stream, one Ogg stream) however many times the text was flushed.
        self._encoder: StreamEncoder | None = None
        #: Spaces that ended a job, timed with the next message.
        self._spaces: list[str] = []
        #: A job is being spoken: the socket is not idle, whatever the client last sent.
        self.speaking = False
        self.task: asyncio.Task[None] | None = None

    def start(self, on_job_end: Callable[[], None], on_end: Callable[[Speaker, ChorusError | None], Awaitable[None]]) -> None:
        """Speaks until the schedule ends, telling `on_job_end` after each job and `on_end` once
        with the error that stopped it, if one did (after its final message where none did)."""
        self.task = asyncio.create_task(self._speak(on_job_end, on_end))

    async def stop(self) -> None:
        """A barge-in: the speech stops now, mid-sentence; what is buffered is dropped."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])

    def final(self) -> dict[str, Any]:
        return {"isFinal": True} if self.id is None else {"isFinal": True, "contextId": self.id}

    async def _speak(self, on_job_end: Callable[[], None],
                     on_end: Callable[[Speaker, ChorusError | None], Awaitable[None]]) -> None:
        try:
            while (fragments := await self.schedule.next_job()) is not None:
                self.speaking = True
                try:
                    await self._speak_job(fragments)
                finally:
                    self.speaking = False
                    on_job_end()
            if self._encoder is not None:
                tail = await to_thread.run_sync(self._encoder.finish)
                if tail:
                    await self._send_audio(tail, None)
        except Exception as exc:
            if not isinstance(exc, ChorusError):
                log.exception("a WebSocket context failed")
            await on_end(self, exc if isinstance(exc, ChorusError) else ChorusError("internal server error"))
            return
        await on_end(self, None)

    async def _speak_job(self, fragments: Fragments) -> None:
        body = TextToSpeechBody(text="", model_id=self._options.model_id, language_code=self._options.language_code,
                                voice_settings=VoiceSettings(speed=self._speed), seed=self._options.seed)
        job = self._service.prepare(ask(self._voice_id, body, self._caller, fragments, word_times=True))
        async with voice_not_found(self._voice_id):
            synthesis = await self._service.synthesis(job)
            if self._encoder is None:
                self._encoder = StreamEncoder(self._fmt, synthesis.sample_rate)
            segments = timed_segments(synthesis, self._encoder, whole_chunks=self._options.sync_alignment)
            async with aclosing(segments):
                async for segment in segments:
                    times = segment.alignment
                    if not segment.audio and (not times or times.ends[-1] == times.starts[0]):
                        # Only the spaces after a job's last word: no sound to time them to, and
                        # clients take a word's end from the next message's times. They open
                        # the context's next message instead.
                        if times:
                            self._spaces += times.characters
                        continue
                    if times and self._spaces:
                        origin = times.starts[0]
                        spaces = CharTimes(self._spaces, [origin] * len(self._spaces), [origin] * len(self._spaces))
                        spaces.extend(times)
                        times, self._spaces = spaces, []
                    await self._send_audio(segment.audio, _alignment_ms(times))

    async def _send_audio(self, audio: bytes, alignment: dict[str, list] | None) -> None:
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
            if self.id is not None:
                message["contextId"] = self.id
            await self._send(message)


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
