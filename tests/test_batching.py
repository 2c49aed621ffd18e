"""functions.batching, the queue every host puts a batching backend behind, with a backend whose
audio is its text: chunks that arrive during a generation share the next one, each gets its own
audio, and a chunk cancelled, failing or seeded changes nothing for the others. The real
libraries' batches are tested in their images (test_transformers_musicgen, test_parler_tts,
test_bark)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Sequence

import pytest
from anyio import CapacityLimiter
from prometheus_client import generate_latest

from functions.batch_metrics import BatchMetrics
from functions.batching import Batcher, Prepared
from functions.protocol import InvalidRequestError, SynthesisRequest
from functions.serving import LoadedBackend, ServingError
from router.metrics import Metrics


class Echo:
    """Each chunk's audio is its text. A generation holds until `free` is set, and fails when a
    chunk reads "bad"."""

    name = "echo"

    def __init__(self) -> None:
        self.generations: list[list[str]] = []
        self.generating = threading.Event()
        self.free = threading.Event()

    def prepare(self, request: SynthesisRequest) -> Prepared:
        if request.speed != 1.0:
            raise InvalidRequestError("no speed", param="speed")
        return Prepared(request.text)

    def generate_batch(self, batch: Sequence[Prepared]) -> list[bytes]:
        self.generations.append([item.inputs for item in batch])
        self.generating.set()
        assert self.free.wait(60), "the test never let the generation end"
        if any(item.inputs == "bad" for item in batch):
            raise ValueError("the model cannot read 'bad'")
        return [item.inputs.encode() for item in batch]


def start(batcher: Batcher, *items: Prepared) -> list[asyncio.Task[bytes]]:
    return [asyncio.ensure_future(batcher.generate(item)) for item in items]


async def busy(echo: Echo, batcher: Batcher) -> asyncio.Task[bytes]:
    """A generation of "first" running, held until `echo.free` is set."""
    (running,) = start(batcher, Prepared("first"))
    assert await asyncio.to_thread(echo.generating.wait, 60)
    return running


async def queued(batcher: Batcher, *items: Prepared) -> list[asyncio.Task[bytes]]:
    tasks = start(batcher, *items)
    await asyncio.sleep(0)  # one turn of the loop: each task queues its chunk before its first await
    return tasks


@pytest.mark.anyio
async def test_chunks_that_arrive_during_a_generation_share_the_next_each_with_its_own_audio() -> None:
    echo, sizes = Echo(), []
    batcher = Batcher(echo, 3, 0, lambda size, waits: sizes.append(size))
    running = await busy(echo, batcher)
    waiting = await queued(batcher, *(Prepared(text) for text in ("b", "c", "d", "e")))
    echo.free.set()
    assert await asyncio.gather(running, *waiting) == [b"first", b"b", b"c", b"d", b"e"]
    # No more than max_batch_size at once; the one left over goes next, behind one batch only.
    assert echo.generations == [["first"], ["b", "c", "d"], ["e"]]
    assert sizes == [1, 3, 1]


@pytest.mark.anyio
async def test_a_cancelled_chunk_leaves_the_others_whole() -> None:
    echo = Echo()
    batcher = Batcher(echo, 4, 0, lambda size, waits: None)
    running = await busy(echo, batcher)
    b, c, d = await queued(batcher, Prepared("b"), Prepared("c"), Prepared("d"))
    # One cancelled while generating, one while queued.
    running.cancel()
    c.cancel()
    echo.free.set()
    assert await asyncio.gather(b, d) == [b"b", b"d"]
    assert running.cancelled() and c.cancelled()
    assert echo.generations == [["first"], ["b", "d"]]


@pytest.mark.anyio
async def test_a_chunk_cancelled_while_waiting_for_company_lets_the_next_batch_go() -> None:
    echo = Echo()
    echo.free.set()
    batcher = Batcher(echo, 2, 60, lambda size, waits: None)
    # "a" waits (a minute at most) for a chunk with its options; "b" and "c" have other options.
    lonely, *others = await queued(batcher, Prepared("a"), Prepared("b", key="loud"), Prepared("c", key="loud"))
    lonely.cancel()
    # Well within the minute that "a" would have waited: its leaving is noticed at once.
    assert await asyncio.wait_for(asyncio.gather(*others), 30) == [b"b", b"c"]
    assert echo.generations == [["b", "c"]]


@pytest.mark.anyio
async def test_a_chunk_that_fails_its_batch_fails_alone() -> None:
    echo = Echo()
    batcher = Batcher(echo, 4, 0, lambda size, waits: None)
    running = await busy(echo, batcher)
    tasks = await queued(batcher, Prepared("b"), Prepared("bad"), Prepared("d"))
    echo.free.set()
    b, bad, d = await asyncio.gather(*tasks, return_exceptions=True)
    assert (b, d) == (b"b", b"d")
    assert isinstance(bad, ValueError)
    assert await running == b"first"
    assert echo.generations == [["first"], ["b", "bad", "d"], ["b"], ["bad"], ["d"]]


@pytest.mark.anyio
async def test_a_seeded_chunk_goes_alone_and_only_equal_options_share_a_generation() -> None:
    echo = Echo()
    batcher = Batcher(echo, 4, 0, lambda size, waits: None)
    running = await busy(echo, batcher)
    tasks = await queued(batcher, Prepared("seeded", seed=1), Prepared("x", key="loud"), Prepared("y"),
                         Prepared("z", key="loud"), Prepared("w"))
    echo.free.set()
    assert await asyncio.gather(running, *tasks) == [b"first", b"seeded", b"x", b"y", b"z", b"w"]
    assert echo.generations == [["first"], ["seeded"], ["x", "z"], ["y", "w"]]


@pytest.mark.anyio
async def test_on_a_free_model_a_chunk_waits_for_company_until_the_batch_is_full_or_its_time_is_up() -> None:
    echo = Echo()
    echo.free.set()
    # A minute's window, but a full batch starts at once.
    full = Batcher(echo, 2, 60, lambda size, waits: None)
    assert await asyncio.gather(*start(full, Prepared("a"), Prepared("b"))) == [b"a", b"b"]
    # Alone, it starts when its window is over; a seeded chunk, which goes alone, at once.
    alone = Batcher(echo, 2, 0.01, lambda size, waits: None)
    assert await alone.generate(Prepared("c")) == b"c"
    assert await full.generate(Prepared("seeded", seed=1)) == b"seeded"
    assert echo.generations == [["a", "b"], ["c"], ["seeded"]]


@pytest.mark.anyio
async def test_the_host_batches_and_counts_and_bad_input_fails_only_its_request() -> None:
    echo, metrics = Echo(), BatchMetrics()
    echo.free.set()
    loaded = LoadedBackend(echo, CapacityLimiter(4), batcher=Batcher(echo, 2, 60, metrics.observer("echo")))

    async def audio(**fields: object) -> bytes:
        return b"".join([pcm async for pcm in loaded.chunks(SynthesisRequest(model="echo", **fields))])

    outcomes = await asyncio.gather(audio(text="one"), audio(text="two", speed=2.0), audio(text="three"),
                                    return_exceptions=True)
    assert outcomes[0] == b"one" and outcomes[2] == b"three"
    assert isinstance(outcomes[1], ServingError) and outcomes[1].code == "invalid_request"
    # The refused chunk never joined: the two others filled the batch, so it did not wait a minute.
    # A worker's GET /metrics, and the router's in local mode (its own registry), say the same.
    router = Metrics()
    router.add_batches(metrics)
    for exposition in (metrics.exposition(), generate_latest(router.registry).decode()):
        # One batch of two; two chunks waited.
        assert (figure(exposition, "chorus_batch_size_bucket", "1.0"), figure(exposition, "chorus_batch_size_bucket", "2.0"),
                figure(exposition, "chorus_batch_size_count"), figure(exposition, "chorus_batch_size_sum"),
                figure(exposition, "chorus_batch_wait_seconds_count")) == (0, 1, 1, 2, 2), exposition


def figure(exposition: str, series: str, le: str = "") -> float:
    """One series of model "echo" in Prometheus's text format."""
    bound = f'le="{le}",' if le else ""
    return float(re.search(rf'^{series}{{{bound}model="echo"}} (\S+)$', exposition, re.M)[1])
