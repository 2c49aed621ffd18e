"""router.api.common.AudioResponse: however a response ends, the stream behind it is closed, so
the model's place and the backend's stream are released, for audio and for SSE events alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.requests import ClientDisconnect

from router.api.common import AudioResponse
from router.encoding import EncodedAudio


class Rest:
    """The rest of an EncodedAudio, counting its closes."""

    def __init__(self) -> None:
        self.closed = 0

    def __aiter__(self) -> Rest:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


async def events(stream: EncodedAudio) -> AsyncIterator[bytes]:
    async for data in stream:
        yield b"data: " + data + b"\n\n"


@pytest.mark.anyio
@pytest.mark.parametrize("sse", [False, True], ids=["audio", "sse"])
async def test_a_client_gone_before_the_status_line_still_frees_the_stream(sse):
    rest = Rest()
    stream = EncodedAudio("audio/wav", 22050, b"RIFF", rest)
    response = AudioResponse(stream, events(stream), media_type="text/event-stream") if sse else AudioResponse(stream)

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("the client is gone")

    with pytest.raises((OSError, ClientDisconnect)):  # Starlette may re-raise it as the latter
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    assert rest.closed >= 1
