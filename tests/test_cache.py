"""The synthesis cache: an identical request is answered from disk (X-Chorus-Cache: hit) without
touching the backend, or, while the first is still being made, follows it (shared); anything that
changes the audio misses; only complete responses are stored, atomically; the size cap holds with
least-recently-used eviction; it survives a restart; and it is off unless a directory is set."""

from __future__ import annotations

import asyncio
import errno
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from router.cache import SynthesisCache
from router.chunking import chunk_text
from router.encoding import EncodedAudio
from tests._live import DIE, RAISE, Arrivals, ScriptedRunner, assert_family_error, live_app, piper_setup
from tests.audio import decode

SPEECH = "/v1/audio/speech"
TEXT = "A sentence worth keeping."


def body(**changes: object) -> dict:
    return {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav", **changes}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return piper_setup(tmp_path_factory.mktemp("cache"))


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.audio"))


def test_identical_requests_hit_and_cost_no_backend_time(setup, tmp_path):
    configs, models = setup
    runner = ScriptedRunner(models)
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, cache_dir=cache) as url, httpx.Client(base_url=url, timeout=60) as client:
        miss = client.post(SPEECH, json=body())
        assert miss.status_code == 200 and miss.headers["x-chorus-cache"] == "miss"
        backend = runner.begun, runner.pieces, runner.holds
        hit = client.post(SPEECH, json=body())
        assert hit.headers["x-chorus-cache"] == "hit"
        assert hit.headers["content-type"] == miss.headers["content-type"]
        assert hit.content == miss.content
        # No backend time: no chunk begun, no audio made, the model not even held (bench/responsiveness.py
        # times a hit against a miss).
        assert (runner.begun, runner.pieces, runner.holds) == backend, "a hit must not touch the backend"
        assert decode(hit.content).duration > 1.0
        # The same request through another family with the same output is the same audio,
        # but ElevenLabs asks for another format: its own entry.
        eleven = client.post("/v1/text-to-speech/alloy", params={"output_format": "wav_22050"}, json={"text": TEXT})
        assert eleven.headers["x-chorus-cache"] == "miss"
        metrics = client.get("/metrics").text
        assert 'chorus_cache_requests_total{result="hit"} 1.0' in metrics
        assert 'chorus_cache_requests_total{result="miss"} 2.0' in metrics


@pytest.mark.parametrize(
    "change",
    [
        {"input": TEXT + " And more."},
        {"speed": 1.5},
        {"response_format": "mp3"},
        {"response_format": "pcm"},
        {"instructions": "Whisper it."},
    ],
    ids=["text", "speed", "format", "pcm", "instructions"],
)
def test_anything_that_changes_the_audio_misses(setup, tmp_path, change):
    configs, models = setup
    with live_app(configs, models, cache_dir=tmp_path / "cache") as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        assert client.post(SPEECH, json=body(**change)).headers["x-chorus-cache"] == "miss"
        assert client.post(SPEECH, json=body(**change)).headers["x-chorus-cache"] == "hit"


def test_new_weights_under_the_same_name_miss(setup, tmp_path):
    configs, models = setup
    with live_app(configs, models, cache_dir=tmp_path / "cache") as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        voice = models / "en_US-joe-medium.onnx"
        stat = voice.stat()
        # Touch the weights: what was cached was made by other ones.
        import os

        os.utime(voice, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"


def test_failed_and_abandoned_responses_are_not_stored(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    runner = ScriptedRunner(models)
    with live_app(configs, models, runner, cache_dir=cache, chunk_chars=60) as url, httpx.Client(base_url=url, timeout=60) as client:
        broken = f"The first part is fine. {DIE} is what the second part does."
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(SPEECH, json=body(input=broken))
        long_text = " ".join(f"Sentence {n} that nobody waits for." for n in range(20))
        begun = runner.begun
        with client.stream("POST", SPEECH, json=body(input=long_text)) as response:
            next(response.iter_raw())
        runner.wait_idle()  # the abandoned synthesis has ended server-side
        assert runner.begun - begun < len(chunk_text(long_text, 60)), "the abandoned text was synthesised to its end"
        assert entries(cache) == []
        assert list((cache / "partial").iterdir()) == []
        # A broken take never comes back as a hit.
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(SPEECH, json=body(input=broken))


def test_size_cap_evicts_least_recently_used(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    # One sentence as WAV is about 80 kB: the cap holds two entries, not three.
    with live_app(configs, models, cache_dir=cache, cache_max_mb=0.2) as url, httpx.Client(base_url=url, timeout=60) as client:
        texts = ["First of three sentences.", "Second of three sentences.", "Third of three sentences."]
        for text in texts[:2]:
            assert client.post(SPEECH, json=body(input=text)).headers["x-chorus-cache"] == "miss"
        assert len(entries(cache)) == 2
        # Use the first again, so the second is now the least recently used.
        assert client.post(SPEECH, json=body(input=texts[0])).headers["x-chorus-cache"] == "hit"
        assert client.post(SPEECH, json=body(input=texts[2])).headers["x-chorus-cache"] == "miss"
        assert len(entries(cache)) == 2
        assert sum(path.stat().st_size for path in entries(cache)) <= 0.2 * 1024 * 1024
        assert client.post(SPEECH, json=body(input=texts[0])).headers["x-chorus-cache"] == "hit"
        assert client.post(SPEECH, json=body(input=texts[1])).headers["x-chorus-cache"] == "miss"


def test_entries_survive_a_restart(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    with live_app(configs, models, cache_dir=cache) as url:
        first = httpx.post(f"{url}{SPEECH}", json=body(), timeout=60)
    with live_app(configs, models, cache_dir=cache) as url:
        again = httpx.post(f"{url}{SPEECH}", json=body(), timeout=60)
    assert again.headers["x-chorus-cache"] == "hit" and again.content == first.content


def test_off_without_a_directory_or_with_size_zero(setup, tmp_path):
    configs, models = setup
    for settings in ({}, {"cache_dir": tmp_path / "cache", "cache_max_mb": 0}):
        with live_app(configs, models, **settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(2):
                response = client.post(SPEECH, json=body())
                assert response.status_code == 200 and "x-chorus-cache" not in response.headers
    assert not (tmp_path / "cache").exists()


#: Three chunks at chunk_chars=60; a test holds one at its gate (ScriptedRunner) so that requests
#: meet a synthesis at a known point of it.
SLOW_CHUNKS = ["The first of three parts takes its time.", "So does the second part here, slowly.",
               "And the third one closes it, at last."]
SLOW_TEXT = " ".join(SLOW_CHUNKS)


class Listener:
    """One request, streamed in a thread of `pool`: `wait_begun()` returns once its response
    has begun (status and headers in: a follower has joined its take), `result()` is the whole
    response, or the error that cut it."""

    def __init__(self, pool: ThreadPoolExecutor, url: str, text: str = SLOW_TEXT):
        self._begun = threading.Event()
        self._future: Future[httpx.Response] = pool.submit(self._run, url, text)

    def _run(self, url: str, text: str) -> httpx.Response:
        try:
            with httpx.Client(base_url=url, timeout=120) as client, \
                    client.stream("POST", SPEECH, json=body(input=text)) as response:
                self._begun.set()
                response.read()
                return response
        finally:
            self._begun.set()

    def wait_begun(self, timeout: float = 60) -> httpx.Response | None:
        assert self._begun.wait(timeout), f"no response began within {timeout} s"
        if self._future.done():
            return self._future.result()  # an error before the response began is raised here
        return None

    def result(self) -> httpx.Response:
        return self._future.result(timeout=120)

    def outcome(self) -> str:
        try:
            return f"{self.result().status_code}"
        except httpx.RemoteProtocolError:
            return "aborted"  # no truncated file passed off as complete


def test_identical_requests_at_once_share_one_synthesis(setup, tmp_path):
    configs, models = setup
    runner = ScriptedRunner(models, gated=SLOW_CHUNKS[:2])
    arrivals = Arrivals()
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, arrivals, cache_dir=cache, chunk_chars=60) as url, \
            ThreadPoolExecutor(3) as pool:
        first = Listener(pool, url)
        runner.wait_at_gate(SLOW_CHUNKS[0])  # its first bytes are being made
        early = Listener(pool, url)  # one arrives before the first bytes ...
        arrivals.wait(SPEECH, 2)
        runner.open_gate(SLOW_CHUNKS[0])
        early.wait_begun()
        runner.wait_at_gate(SLOW_CHUNKS[1])
        late = Listener(pool, url)  # ... one after them, while the rest is made
        late.wait_begun()
        runner.open_gate(SLOW_CHUNKS[1])
        responses = [first.result(), early.result(), late.result()]
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.headers["x-chorus-cache"] for r in responses] == ["miss", "shared", "shared"]
    assert runner.begun == len(SLOW_CHUNKS), "each chunk is synthesised once for all three"
    assert responses[1].content == responses[0].content == responses[2].content
    assert decode(responses[0].content).duration > 4.0
    assert [path.read_bytes().endswith(responses[0].content) for path in entries(cache)] == [True]
    assert 'chorus_cache_requests_total{result="shared"} 2.0' in metrics


@dataclass
class FirstTake:
    runner: ScriptedRunner
    cache: Path
    url: str
    client: httpx.Client
    #: The first client's response, open: its first part read, the second held at its gate.
    first: httpx.Response
    reading: Iterator[bytes]  # kept: a dropped iterator closes the connection


@contextmanager
def first_take_at_the_gate(setup, tmp_path) -> Iterator[FirstTake]:
    configs, models = setup
    runner = ScriptedRunner(models, gated=[SLOW_CHUNKS[1]])
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, cache_dir=cache, chunk_chars=60) as url, \
            httpx.Client(base_url=url, timeout=60) as client, \
            client.stream("POST", SPEECH, json=body(input=SLOW_TEXT)) as first:
        assert first.headers["x-chorus-cache"] == "miss"
        reading = first.iter_raw()
        next(reading)
        runner.wait_at_gate(SLOW_CHUNKS[1])  # the rest of the take is still to be made
        yield FirstTake(runner, cache, url, client, first, reading)


def test_a_follower_gets_everything_when_the_first_client_leaves(setup, tmp_path):
    with first_take_at_the_gate(setup, tmp_path) as take, ThreadPoolExecutor(1) as pool:
        follower = Listener(pool, take.url)
        follower.wait_begun()  # it follows the take now
        take.first.close()
        take.runner.open_gate(SLOW_CHUNKS[1])
        response = follower.result()
        # The first client is gone; the one that followed still gets the whole take.
        assert response.status_code == 200 and response.headers["x-chorus-cache"] == "shared"
        assert decode(response.content).duration > 4.0
        assert take.runner.begun == len(SLOW_CHUNKS)
        again = take.client.post(SPEECH, json=body(input=SLOW_TEXT))
        assert again.headers["x-chorus-cache"] == "hit" and again.content == response.content


def test_when_every_follower_leaves_the_backend_stops(setup, tmp_path):
    with first_take_at_the_gate(setup, tmp_path) as take:
        runner, cache = take.runner, take.cache
        with httpx.Client(base_url=take.url, timeout=60) as other, \
                other.stream("POST", SPEECH, json=body(input=SLOW_TEXT)) as second:
            assert second.headers["x-chorus-cache"] == "shared"
            next(second.iter_raw())
        take.first.close()
        # Both left while the second part waited at its gate: nobody listens, so the synthesis
        # ends there (a server that went on would hold the model at that gate).
        runner.wait_idle()
        assert runner.begun < len(SLOW_CHUNKS), "nobody listens: the rest is not synthesised"
        assert entries(cache) == [] and list((cache / "partial").iterdir()) == []
        # And the next identical request starts afresh rather than following the dead take.
        runner.open_gate(SLOW_CHUNKS[1])
        response = take.client.post(SPEECH, json=body(input=SLOW_TEXT))
        assert response.headers["x-chorus-cache"] == "miss" and decode(response.content).duration > 4.0


def test_a_take_that_fails_fails_its_followers_too(setup, tmp_path):
    configs, models = setup
    dying_part = f"{DIE} is what the second part does."
    dying = f"{SLOW_CHUNKS[0]} {dying_part}"
    runner = ScriptedRunner(models, gated=[dying_part])
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, cache_dir=cache, chunk_chars=60) as url, ThreadPoolExecutor(2) as pool:
        first = Listener(pool, url, dying)
        runner.wait_at_gate(dying_part)  # its first part is out, the failing one about to be made
        follower = Listener(pool, url, dying)
        follower.wait_begun()
        runner.open_gate(dying_part)
        assert [first.outcome(), follower.outcome()] == ["aborted", "aborted"]
    assert runner.begun == 2, "the follower followed: the failing take was made once"
    assert entries(cache) == [] and list((cache / "partial").iterdir()) == []


def test_an_error_before_the_first_bytes_is_every_waiters_error(setup, tmp_path):
    configs, models = setup
    runner = ScriptedRunner(models)
    with live_app(configs, models, runner, cache_dir=tmp_path / "cache") as url:
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{url}{SPEECH}", json=body(input=f"{RAISE}."), timeout=60), range(3)))
    for response in responses:
        error = assert_family_error(response, 500)
        assert "scripted crash" in error["message"]


def test_a_take_too_big_to_keep_is_still_whole_for_everyone(setup, tmp_path):
    # The cap (50 kB) is under one chunk's audio: nothing is stored, nobody gets less.
    configs, models = setup
    runner = ScriptedRunner(models, gated=[SLOW_CHUNKS[1]])
    cache = tmp_path / "cache"
    with live_app(configs, models, runner, cache_dir=cache, cache_max_mb=0.05, chunk_chars=60) as url, \
            ThreadPoolExecutor(2) as pool:
        first = Listener(pool, url)
        runner.wait_at_gate(SLOW_CHUNKS[1])  # past the cap already, the rest still to come
        follower = Listener(pool, url)
        follower.wait_begun()
        runner.open_gate(SLOW_CHUNKS[1])
        responses = [first.result(), follower.result()]
        alone = httpx.post(f"{url}{SPEECH}", json=body(input=SLOW_TEXT), timeout=60)
    assert [r.headers["x-chorus-cache"] for r in responses] == ["miss", "shared"]
    assert responses[0].content == responses[1].content
    for response in (*responses, alone):
        assert decode(response.content).duration > 4.0
    assert alone.headers["x-chorus-cache"] == "miss"
    assert entries(cache) == [] and list((cache / "partial").iterdir()) == []


def test_an_unreadable_entry_is_dropped_and_made_again(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    with live_app(configs, models, cache_dir=cache) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        [entry] = entries(cache)
        entry.write_bytes(b"\x00\x00\xff\xffnot an entry")  # a header that promises too much
        again = client.post(SPEECH, json=body())
        assert again.status_code == 200 and again.headers["x-chorus-cache"] == "miss"
        assert decode(again.content).duration > 1.0
        hit = client.post(SPEECH, json=body())
    assert hit.headers["x-chorus-cache"] == "hit" and hit.content == again.content


def test_a_cache_that_cannot_write_still_answers_in_full(setup, tmp_path):
    configs, models = setup
    cache = tmp_path / "cache"
    with live_app(configs, models, cache_dir=cache) as url, httpx.Client(base_url=url, timeout=60) as client:
        # A cleaner emptied the disk under the running server: the cache makes its folders again.
        shutil.rmtree(cache)
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "miss"
        assert client.post(SPEECH, json=body()).headers["x-chorus-cache"] == "hit"
        # Now nothing can be written there: requests are answered whole, and nothing is kept.
        shutil.rmtree(cache / "partial")
        (cache / "partial").write_bytes(b"")
        for _ in range(2):
            response = client.post(SPEECH, json=body(input="Said, and never written down."))
            assert response.status_code == 200 and response.headers["x-chorus-cache"] == "miss"
            assert decode(response.content).duration > 1.0
    assert len(entries(cache)) == 1


class FullDisk:
    """A take's file on a disk that has just filled up: reads work, writes fail."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@pytest.mark.anyio
@pytest.mark.parametrize("readers", [1, 2])
async def test_a_full_disk_mid_response_costs_the_entry_not_a_lone_clients_audio(tmp_path, readers):
    stopped: list[str] = []
    cache = SynthesisCache(tmp_path / "cache", 1_000_000, tmp_path)

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b"b" * 10
            yield b"c" * 10
            stopped.append("ended")
        except GeneratorExit:
            stopped.append("closed")
            raise

    take = cache.record("key", EncodedAudio("audio/wav", 22050, b"a" * 10, source()))
    take._file = FullDisk(take._file)

    async def read(reader) -> bytes | str:
        # Closed however it ends, as a response closes its stream.
        async with aclosing(reader):
            try:
                return b"a" * 10 + b"".join([piece async for piece in reader])
            except OSError as exc:
                return exc.strerror

    got = await asyncio.gather(*(read(take.reader(10)) for _ in range(readers)))
    await asyncio.sleep(0)
    stopped_then = list(stopped)  # before the loop's own clean-up closes what was left open
    if readers == 1:
        assert got == [b"a" * 10 + b"b" * 10 + b"c" * 10]
        assert stopped_then == ["ended"]
    else:
        # A follower may lag behind the head, reading bytes only the file would hold: both
        # stop, and so does the synthesis behind them.
        assert got == ["No space left on device"] * 2
        assert stopped_then == ["closed"]
    assert entries(tmp_path / "cache") == [] and list((tmp_path / "cache" / "partial").iterdir()) == []
