"""What the voice-agent framework tests share (tests/test_agents.py drives LiveKit's plugins,
tests/test_pipecat.py Pipecat's services): the replies they speak, the length the same text has
when it is synthesised over plain HTTP, and a runner that lets a test count the chunks of one
reply the backend began and wait until none is being made."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import httpx
from anyio import to_thread

from functions.streams import Stream
from tests._live import ScriptedRunner
from tests.audio import decode

VOICE = "en_US-joe-medium"
#: An agent's reply of three sentences, about 7 s of speech.
REPLY = (
    "Hello there, and thanks for calling the booking line today. "
    "I have moved your table for four people to Friday evening at seven. "
    "Is there anything else I can help you with before you go?"
)
#: The word that marks every sentence of LONG_REPLY, and so every chunk synthesised from it.
LONG_MARK = "paragraph"
_LONG_SENTENCES = [
    f"This is sentence {n} of a long {LONG_MARK} that the agent reads out loud to the caller." for n in range(1, 31)
]
#: A reply long enough to be interrupted mid-way: thirty sentences, over two minutes of speech.
LONG_REPLY = " ".join(_LONG_SENTENCES)
#: chunk_chars for the barge-in tests: each sentence of LONG_REPLY is a chunk of its own (the
#: default packs two or three into one), so "within one chunk" is within one sentence, and work
#: that goes on after a barge-in shows as chunks begun however fast the machine is.
SENTENCE_CHUNKS = max(len(sentence) for sentence in _LONG_SENTENCES)


async def http_seconds(url: str, text: str) -> float:
    """Seconds of speech `text` gives over plain HTTP (POST /v1/audio/speech as WAV): the length
    a framework's rendering of the same text must have."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        response = await http.post("/v1/audio/speech", json={"model": "tts-1", "voice": VOICE, "input": text,
                                                             "response_format": "wav"})
    assert response.status_code == 200, response.text
    return decode(response.content).duration


def assert_whole(seconds: float, reference: float, what: str) -> None:
    """`seconds` of audio is the whole reply: within 10% of the same text over plain HTTP."""
    assert abs(seconds - reference) <= 0.1 * reference, (
        f"{what} gave {seconds:.2f} s of audio; the same text over plain HTTP gives {reference:.2f} s")


class WatchedRunner(ScriptedRunner):
    """ScriptedRunner that also keeps the text of every chunk synthesis begun, and lets a test
    wait (in a worker thread, on a condition: no polling) until no chunk is being made."""

    def __init__(self, models_dir: Path):
        super().__init__(models_dir)
        self.texts: list[str] = []
        self.changed = threading.Condition()

    def begun_with(self, mark: str) -> int:
        """How many chunk syntheses begun so far hold `mark`."""
        with self.changed:
            return sum(mark in text for text in self.texts)

    async def stream(self, config, request):
        with self.changed:
            self.texts.append(request.text)
            self.changed.notify_all()
        return await super().stream(config, request)

    async def _chunks(self, chunks: Stream[bytes], text: str) -> AsyncIterator[bytes]:
        inner = super()._chunks(chunks, text)
        try:
            async with aclosing(inner):
                async for pcm in inner:
                    yield pcm
        finally:
            with self.changed:
                self.changed.notify_all()

    async def wait_idle(self, timeout: float = 120) -> None:
        """Until no chunk stream is open (fails after `timeout`, a hang guard)."""

        def wait() -> bool:
            with self.changed:
                return self.changed.wait_for(lambda: self.open == 0, timeout)

        assert await to_thread.run_sync(wait), f"the backend was still synthesising after {timeout} s"
