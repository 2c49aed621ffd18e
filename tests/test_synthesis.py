"""The synthesis owner and the parts it composes, each on its own: no server, no backend, no
clock but the one a time-out is about. Every way a synthesis ends (done, its client gone, an
error, a time-out, a refusal at its start) is checked by counting what it took and gave back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from functions.config import ModelConfig
from functions.protocol import SynthesisRequest
from functions.streams import END, one_by_one, primed, released_by
from router.admission import Admission, ModelQueue
from router.chunking import FLUSH, TextChunks
from router.errors import BackendTimeout, InvalidRequest, Overloaded, SynthesisFailed
from router.fan_out import FanOut
from router.metrics import Metrics
from router.runners import PcmStream, Runner
from router.speech import SpeechJob
from router.stalls import with_stall_timeout
from router.synthesis import Synthesis

pytestmark = pytest.mark.anyio

RATE = 16000
#: A chunk whose text holds one of these: fails at its start, fails after its first audio, or
#: sends its first audio and then nothing.
FAIL, DIE, STALL = "FAIL", "DIE", "STALL"


def pcm_of(text: str) -> bytes:
    data = text.encode()
    return data + b"\0" * (len(data) % 2)


class CountingRunner(Runner):
    """A backend whose audio is its chunk's text, in two pieces; it counts the streams it opens
    and that are closed, and the holds taken and given back."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed = 0
        self.holds = self.released = 0
        self.all_closed = asyncio.Event()

    async def start(self, preload: list[ModelConfig]) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    async def voices(self, config: ModelConfig) -> list[str]:
        return []

    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        text = request.text
        if FAIL in text:
            raise SynthesisFailed("failed on purpose")
        self.opened.append(text)
        self.all_closed.clear()

        async def audio() -> AsyncIterator[bytes]:
            yield pcm_of(text)
            if DIE in text:
                raise SynthesisFailed("died on purpose")
            if STALL in text:
                await asyncio.Event().wait()
            yield pcm_of(text)

        async def closed() -> None:
            self.closed += 1
            if self.closed == len(self.opened):
                self.all_closed.set()

        return PcmStream(RATE, released_by(audio(), closed))

    def hold(self, config: ModelConfig):
        self.holds += 1

        def release() -> None:
            self.released += 1

        return release


@pytest.fixture
def runner() -> CountingRunner:
    return CountingRunner()


@pytest.fixture
def admission() -> Admission:
    return Admission(queue=4, timeout=5)


def job(text: str = "", fan_out: int = 1, timeout: int = 600, fragments=None) -> SpeechJob:
    config = ModelConfig(name="tts-1", backend="piper", deploy={"fan_out": fan_out, "timeout": timeout})
    return SpeechJob(config, SynthesisRequest(model="tts-1", text=text), "input", 4096, "tts-1", fragments)


def synthesis(runner: Runner, admission: Admission, speech: SpeechJob, metrics: Metrics | None = None) -> Synthesis:
    # 20 characters a chunk: one sentence each below.
    return Synthesis(speech, runner, admission, metrics or Metrics(), chunk_chars=20)


async def released_everything(runner: CountingRunner, admission: Admission) -> None:
    """Every stream opened was closed once, every hold given back once, no place still held."""
    await asyncio.wait_for(runner.all_closed.wait(), 10)
    assert runner.closed == len(runner.opened)
    assert runner.released == runner.holds
    for gate in admission.gates.values():
        assert (gate.active, gate.waiting) == (0, 0)


SENTENCES = ["First one here.", "Second one.", "Third and last."]
TEXT = " ".join(SENTENCES)


@pytest.mark.parametrize("fan_out", [1, 3])
async def test_heard_to_its_end_it_releases_everything_once(runner, admission, fan_out):
    heard = synthesis(runner, admission, job(TEXT, fan_out))
    await heard.open()
    steps = [step async for step in heard]
    assert b"".join(step.pcm for step in steps) == b"".join(pcm_of(s) * 2 for s in SENTENCES)
    assert [step.chunk for step in steps if step.ended] == [0, 1, 2]
    assert heard.text == TEXT
    await heard.aclose()  # a second close changes nothing
    await released_everything(runner, admission)
    assert (runner.holds, len(runner.opened)) == (1, 3)


@pytest.mark.parametrize("fan_out", [1, 3])
async def test_a_client_that_leaves_mid_audio_releases_everything_once(runner, admission, fan_out):
    # The later chunks stall: begun ahead (fan-out), only the close can end them.
    heard = synthesis(runner, admission, job(f"{SENTENCES[0]} Then a {STALL}. A {STALL} again.", fan_out))
    await heard.open()
    assert (await anext(heard)).pcm == pcm_of(SENTENCES[0])
    await asyncio.wait_for(_until(lambda: len(runner.opened) == fan_out), 5)
    await heard.aclose()
    await heard.aclose()
    await released_everything(runner, admission)
    assert len(runner.opened) == fan_out  # none begun since
    with pytest.raises(StopAsyncIteration):
        await anext(heard)


async def test_a_backend_that_fails_mid_audio_releases_everything_and_counts_the_error(runner, admission):
    metrics = Metrics()
    heard = synthesis(runner, admission, job(f"{SENTENCES[0]} Then it {DIE}s.", fan_out=2), metrics)
    await heard.open()
    with pytest.raises(SynthesisFailed):
        async for _ in heard:
            pass
    await released_everything(runner, admission)
    assert metrics.backend_errors.labels("tts-1", "synthesis_failed")._value.get() == 1


async def test_a_backend_that_refuses_the_first_chunk_fails_the_open_and_keeps_nothing(runner, admission):
    heard = synthesis(runner, admission, job(f"It will {FAIL}. Never heard."))
    with pytest.raises(SynthesisFailed):
        await heard.open()
    assert (runner.holds, runner.released, runner.opened) == (1, 1, [])
    assert admission.gates[("tts-1", "piper")].active == 0


async def test_a_backend_that_stalls_times_out_and_releases_everything(runner, admission):
    heard = synthesis(runner, admission, job(f"It will {STALL} here.", timeout=1))
    await heard.open()
    assert (await anext(heard)).pcm
    with pytest.raises(BackendTimeout, match="sent no audio for 1 s"):
        await anext(heard)
    await released_everything(runner, admission)


async def test_a_reader_cancelled_mid_chunk_releases_everything(runner, admission):
    heard = synthesis(runner, admission, job(f"It will {STALL} here."))
    await heard.open()
    await anext(heard)
    reader = asyncio.ensure_future(anext(heard))
    await asyncio.wait([reader], timeout=0.1)  # it is waiting on the stalled backend
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await released_everything(runner, admission)


async def test_fragments_that_bring_no_text_are_refused_before_taking_a_place(runner, admission):
    async def fragments() -> AsyncIterator[object]:
        yield "  "
        yield FLUSH

    heard = synthesis(runner, admission, job(fragments=fragments()))
    with pytest.raises(InvalidRequest, match="no letters or digits"):
        await heard.open()
    assert (runner.holds, admission.gates) == (0, {})


async def test_a_model_past_its_queue_refuses_and_the_refused_holds_nothing(runner):
    admission = Admission(queue=0, timeout=5)
    speech = job(TEXT)
    first = synthesis(runner, admission, speech)
    await first.open()
    # capacity 4 inputs / fan-out 1: four places; the fifth synthesis finds no room.
    others = [synthesis(runner, admission, speech) for _ in range(3)]
    for other in others:
        await other.open()
    refused = synthesis(runner, admission, speech)
    with pytest.raises(Overloaded) as raised:
        await refused.open()
    assert raised.value.status == 429
    assert runner.holds == 4
    for opened in [first, *others]:
        await opened.aclose()
    await released_everything(runner, admission)


async def test_its_fragments_are_closed_once_whoever_ends_it(runner, admission):
    closes = 0
    more = asyncio.Event()

    async def fragments() -> AsyncIterator[object]:
        nonlocal closes
        try:
            yield "Spoken as it comes. "
            yield FLUSH
            await more.wait()
            yield "Never sent."
        finally:
            closes += 1

    heard = synthesis(runner, admission, job(fragments=fragments()))
    await heard.open()
    assert (await anext(heard)).text == "Spoken as it comes."
    await heard.aclose()
    await released_everything(runner, admission)
    assert closes == 1
    assert heard.text == "Spoken as it comes. "


# --- the model queue --------------------------------------------------------------------


async def test_the_queue_serves_in_order_and_refuses_past_its_length():
    queue = ModelQueue("tts-1", limit=1, queue=2, timeout=5)
    holder = await queue.enter()
    served: list[str] = []

    async def wait(name: str):
        slot = await queue.enter()
        served.append(name)
        return slot

    first, second = asyncio.ensure_future(wait("first")), asyncio.ensure_future(wait("second"))
    await asyncio.wait([first, second], timeout=0.05)
    assert (queue.active, queue.waiting) == (1, 2)
    with pytest.raises(Overloaded) as refused:
        await queue.enter()
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    holder.leave()
    (await first).leave()
    (await second).leave()
    assert served == ["first", "second"]
    assert (queue.active, queue.waiting) == (0, 0)


async def test_a_wait_past_the_time_out_is_a_503_and_leaves_the_queue():
    queue = ModelQueue("tts-1", limit=1, queue=1, timeout=0.05)
    holder = await queue.enter()
    with pytest.raises(Overloaded) as raised:
        await queue.enter()
    assert raised.value.status == 503
    assert (queue.active, queue.waiting) == (1, 0)
    holder.leave()
    holder.leave()  # leaving twice gives back one place
    assert queue.active == 0


async def test_a_place_handed_to_a_waiter_that_is_cancelled_goes_to_the_next():
    queue = ModelQueue("tts-1", limit=1, queue=2, timeout=5)
    holder = await queue.enter()
    cancelled, next_in_line = asyncio.ensure_future(queue.enter()), asyncio.ensure_future(queue.enter())
    await asyncio.wait([cancelled, next_in_line], timeout=0.05)
    holder.leave()  # handed to `cancelled`, which is cancelled before it runs
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    (await next_in_line).leave()
    assert (queue.active, queue.waiting) == (0, 0)


# --- the fan-out ------------------------------------------------------------------------


async def test_the_fan_out_begins_chunks_ahead_and_gives_them_in_order():
    chunks = TextChunks(TEXT, 20, True, 4096, "input")
    begun: list[str] = []
    finish = {text: asyncio.Event() for text in SENTENCES}

    async def open_chunk(text: str) -> PcmStream:
        begun.append(text)

        async def audio() -> AsyncIterator[bytes]:
            await finish[text].wait()
            yield pcm_of(text)

        return PcmStream(RATE, audio())

    first = await chunks.next()
    assert first is not None
    fan_out = FanOut(chunks, first, await open_chunk(first), 3, open_chunk)
    heard: list[tuple[str, bytes]] = []
    async for text, stream in fan_out.streams():
        if text == SENTENCES[0]:
            # The later chunks end first; they are heard after the first all the same.
            for later in reversed(SENTENCES):
                finish[later].set()
        heard += [(text, pcm) async for pcm in stream.audio]
    assert begun == SENTENCES
    assert heard == [(s, pcm_of(s)) for s in SENTENCES]


async def test_closing_the_fan_out_stops_the_chunks_begun_ahead():
    chunks = TextChunks(TEXT, 20, True, 4096, "input")
    ended: list[str] = []

    async def open_chunk(text: str) -> PcmStream:
        async def audio() -> AsyncIterator[bytes]:
            try:
                await asyncio.Event().wait()
                yield b""
            finally:
                ended.append(text)

        return PcmStream(RATE, audio())

    first = await chunks.next()
    assert first is not None
    fan_out = FanOut(chunks, first, await open_chunk(first), 3, open_chunk)
    streams = fan_out.streams()
    await anext(streams)
    await asyncio.wait([asyncio.ensure_future(asyncio.Event().wait())], timeout=0.05)
    fan_out.close()
    await streams.aclose()
    await asyncio.wait([asyncio.ensure_future(asyncio.Event().wait())], timeout=0.05)
    assert sorted(ended) == sorted(SENTENCES[1:])


# --- the stall time-out and the stream helpers ------------------------------------------


async def test_a_stream_silent_past_its_time_out_fails_and_is_closed_once():
    closes = 0

    async def audio() -> AsyncIterator[bytes]:
        yield b"\0\0"
        await asyncio.Event().wait()
        yield b"\0\0"

    async def closed() -> None:
        nonlocal closes
        closes += 1

    timed = with_stall_timeout(released_by(audio(), closed), 0.05, "tts-1")
    assert await anext(timed) == b"\0\0"
    with pytest.raises(BackendTimeout, match="model 'tts-1' sent no audio"):
        await anext(timed)
    await timed.aclose()
    await asyncio.wait_for(_until(lambda: closes == 1), 5)
    assert closes == 1


async def test_released_by_runs_its_release_once_however_the_stream_ends():
    counts = {"unread": 0, "read": 0, "failed": 0}

    def counted(name: str):
        async def release() -> None:
            counts[name] += 1
        return release

    async def items(fail: bool = False) -> AsyncIterator[int]:
        yield 1
        if fail:
            raise ValueError("broken")

    unread = released_by(items(), counted("unread"))
    await unread.aclose()
    await unread.aclose()
    read = released_by(items(), counted("read"))
    assert [item async for item in read] == [1]
    await read.aclose()
    failed = released_by(items(fail=True), counted("failed"))
    with pytest.raises(ValueError):
        async for _ in failed:
            pass
    assert counts == {"unread": 1, "read": 1, "failed": 1}


async def test_primed_puts_its_first_item_before_the_rest_and_closes_the_rest():
    closes = 0

    async def close() -> None:
        nonlocal closes
        closes += 1

    async def rest() -> AsyncIterator[int]:
        yield 2
        yield 3

    assert [item async for item in primed(1, released_by(rest(), close))] == [1, 2, 3]
    early = primed(1, released_by(rest(), close))
    assert await anext(early) == 1
    await early.aclose()
    assert closes == 2


async def test_one_by_one_lets_a_leaving_reader_go_and_closes_after_the_fetch_it_could_not_stop():
    fetched, closes = asyncio.Event(), 0
    may_finish = asyncio.Event()

    async def fetch() -> object:
        if fetched.is_set():
            await may_finish.wait()  # a call that cannot be interrupted (interrupt=False)
            return END
        fetched.set()
        return "first"

    async def close() -> None:
        nonlocal closes
        closes += 1

    items = one_by_one(fetch, close, interrupt=False)
    assert await anext(items) == "first"
    reader = asyncio.ensure_future(anext(items))
    await asyncio.wait([reader], timeout=0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await items.aclose()
    assert closes == 0, "closed while its fetch still ran"
    may_finish.set()
    await asyncio.wait_for(_until(lambda: closes == 1), 5)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)  # each turn of the loop runs what the condition waits for
