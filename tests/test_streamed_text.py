"""Text that arrives in fragments (as ElevenLabs' WebSocket and Wyoming clients send it): the speech
service sends each chunk to the backend as soon as its sentences are complete, while later text
is still arriving, and checks streamed text as it checks whole text. Real Piper, in process."""

from __future__ import annotations

import asyncio

import pytest

from router.chunking import FLUSH, TextChunks, chunk_text
from router.encoding import AudioFormat
from router.errors import InvalidRequest
from router.registry import ModelRegistry
from router.runners.local import InProcessRunner
from router.settings import Settings
from router.speech import Ask, SpeechService
from tests._live import piper_setup
from tests.audio import PIPER_RATE

pytestmark = pytest.mark.anyio

THREE_SENTENCES = "Hello there, friend. This sentence arrives word by word. The last one ends it."


@pytest.fixture
async def service(tmp_path):
    configs, models = piper_setup(tmp_path)
    settings = Settings(configs_dir=configs, models_dir=models, max_input_chars=200)
    runner = InProcessRunner(models)
    registry = ModelRegistry.from_dir(configs, models)
    await runner.start(registry.all())
    yield SpeechService(registry, runner, settings)
    await runner.close()


def streamed_job(service: SpeechService, fragments):
    return service.prepare(Ask(text=fragments, text_param="text", model=None, family="elevenlabs"))


async def all_pcm(stream) -> bytes:
    return b"".join([pcm async for pcm in stream.audio])


async def test_the_first_sentence_is_spoken_while_the_rest_is_still_being_written(service):
    """The writer hands over the first sentence a word at a time, then writes nothing more until
    that sentence's audio has come (a service that waited for the whole text would never speak:
    the writer's 60 s wait, a hang guard, fails it)."""
    words = THREE_SENTENCES.split(" ")
    first_sentence = next(i for i, word in enumerate(words) if word.endswith(".")) + 1
    spoken = asyncio.Event()
    handed_over: list[str] = []

    async def writer():
        for number, word in enumerate(words):
            if number == first_sentence:
                await asyncio.wait_for(spoken.wait(), 60)
            handed_over.append(word)
            yield word + " "

    synthesis = await service.synthesis(streamed_job(service, writer()))
    first = next_pcm = b""
    async for step in synthesis:
        if step.pcm and not first:
            first, written_when_heard = step.pcm, len(handed_over)
            spoken.set()
        else:
            next_pcm += step.pcm
    pcm = first + next_pcm
    assert first and written_when_heard == first_sentence < len(words), "the first audio waited for more text"
    seconds = len(pcm) / 2 / PIPER_RATE
    whole = await all_pcm(await service.pcm(service.prepare(Ask(text=THREE_SENTENCES, text_param="text", model=None))))
    # Cut at the same sentences, so about the same audio as the text given whole.
    assert abs(seconds - len(whole) / 2 / PIPER_RATE) < 0.5
    # What was spoken is read from the synthesis: the whole text, once it has all arrived.
    assert synthesis.text.strip() == THREE_SENTENCES


async def test_a_flush_sends_an_unfinished_sentence_at_once(service):
    spoken = asyncio.Event()

    async def pieces():
        yield "Hello there my friend"  # no full stop: a sentence not ended
        yield FLUSH
        await asyncio.wait_for(spoken.wait(), 30)  # more text only once the first audio came
        yield " and goodbye."

    stream = await service.pcm(streamed_job(service, pieces()))
    first = await anext(stream.audio)
    spoken.set()
    rest = b"".join([piece async for piece in stream.audio])
    assert first and rest


async def test_streamed_text_past_the_limit_is_refused_naming_the_field(service):
    async def pieces():
        for _ in range(30):
            yield "Ten chars. "

    # Refused as soon as the limit is passed: before the first audio here, or later in a
    # slower stream.
    with pytest.raises(InvalidRequest) as refused:
        stream = await service.pcm(streamed_job(service, pieces()))
        async for _ in stream.audio:
            pass
    assert refused.value.param == "text" and "limit is 200" in refused.value.message


async def test_streamed_text_with_nothing_to_speak_is_a_400(service):
    async def pieces():
        yield "... "
        yield "\x00?!"

    with pytest.raises(InvalidRequest) as refused:
        await service.audio(streamed_job(service, pieces()), AudioFormat("wav"))
    assert refused.value.param == "text" and "letters or digits" in refused.value.message


async def test_control_characters_in_a_piece_are_scrubbed(service):
    async def pieces():
        yield "Hello\x00 there."

    pcm = await all_pcm(await service.pcm(streamed_job(service, pieces())))
    assert len(pcm) / 2 / PIPER_RATE > 0.3


@pytest.mark.parametrize("text", [
    "A. B. C.", "First sentence here. Second one! Third one? Fourth one.", "x" * 300,
    "Hello world. " * 40, "3.14 is pi. 中文。好的！ end", "word " * 120 + "end.", "a, b; " * 100, "",
    "Hi there." + " " * 400,
])
@pytest.mark.parametrize("max_chars", [20, 60, 250])
async def test_text_in_one_piece_is_cut_as_chunk_text_cuts_it(text, max_chars):
    async def one():
        yield text

    chunks = TextChunks(one(), max_chars, True, 10_000, "text")
    cut = []
    while (chunk := await chunks.next()) is not None:
        cut.append(chunk)
    assert cut == chunk_text(text, max_chars)


async def test_streamed_text_is_never_answered_from_the_cache(tmp_path, service):
    from router.cache import SynthesisCache

    service.cache = SynthesisCache(tmp_path / "cache", 10_000_000, service.registry.models_dir)

    async def pieces(text: str):
        yield text

    heard = []
    for text in ("Hi.", "A much longer sentence than the first one, with many more words in it."):
        stream = await service.audio(streamed_job(service, pieces(text)), AudioFormat("wav"))
        assert "X-Chorus-Cache" not in stream.headers
        heard.append(stream.first + b"".join([chunk async for chunk in stream.rest]))
    assert len(heard[1]) > 2 * len(heard[0])


async def test_a_sentence_longer_than_a_chunk_leaves_in_parts_with_every_word_whole():
    text = " ".join(f"word{n}" for n in range(40)) + ". The end."

    async def pieces():
        for word in text.split(" "):
            yield word + " "

    chunks = TextChunks(pieces(), 40, True, 10_000, "text")
    cut = []
    while (chunk := await chunks.next()) is not None:
        cut.append(chunk)
    assert len(cut) > 3 and all(len(chunk) <= 40 for chunk in cut)
    assert " ".join(cut).split() == text.split()
