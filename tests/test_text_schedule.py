"""The WebSocket's text schedule on its own: when a context's text is released for synthesis
(ElevenLabs' `chunk_length_schedule`, `auto_mode`, `flush`), and how it is cut into jobs."""

from __future__ import annotations

import pytest

from router.api.elevenlabs.schedule import TextSchedule
from router.chunking import FLUSH

pytestmark = pytest.mark.anyio


async def piece(job) -> str:
    """A job's text up to its next cut."""
    text = ""
    async for fragment in job:
        if fragment is FLUSH:
            return text
        text += fragment
    return text


async def test_text_below_the_first_step_waits_and_a_step_releases_it_at_a_pause():
    schedule = TextSchedule([20, 50], limit=4096)
    schedule.add("Hello there, ", auto_mode=False)
    assert schedule.buffer == "Hello there, "
    schedule.add("friend. How are", auto_mode=False)
    # 20 characters reached: cut at the last pause past them, the rest kept for the next step.
    assert await piece(await schedule.next_job()) == "Hello there, friend. "
    assert schedule.buffer == "How are"


async def test_text_without_a_pause_waits_for_one():
    schedule = TextSchedule([10], limit=4096)
    schedule.add("no pause in this stretch", auto_mode=False)
    assert schedule.buffer == "no pause in this stretch"
    schedule.add(" at all; now", auto_mode=False)
    assert schedule.buffer == "now"


async def test_auto_mode_releases_every_fragment_at_once():
    schedule = TextSchedule([120], limit=4096)
    schedule.add("Hi", auto_mode=True)
    assert schedule.buffer == ""
    assert await anext(await schedule.next_job()) == "Hi"


async def test_a_flush_ends_the_job_and_an_empty_one_marks_the_whole_text():
    schedule = TextSchedule([120], limit=4096)
    schedule.add(" Short", auto_mode=False)
    schedule.flush(ends=True)
    assert schedule.flushed
    job = await schedule.next_job()
    assert await piece(job) == " Short"
    assert [item async for item in job] == []  # and the job ends
    schedule.add(" more", auto_mode=False)
    assert not schedule.flushed


async def test_spaces_before_a_jobs_first_word_are_not_a_job():
    schedule = TextSchedule([120], limit=4096)
    schedule.add(" ", auto_mode=False)
    schedule.flush(ends=False)
    schedule.add("Words", auto_mode=False)
    schedule.end()
    job = await schedule.next_job()
    assert await piece(job) == "Words"


async def test_no_job_is_longer_than_the_limit():
    schedule = TextSchedule([10], limit=30)
    words = "word " * 20
    schedule.add(words, auto_mode=False)
    schedule.end()
    jobs = []
    while (job := await schedule.next_job()) is not None:
        jobs.append("".join(f for f in [item async for item in job] if f is not FLUSH))
    assert "".join(jobs) == words
    assert len(jobs) > 1 and all(len(job) <= 30 for job in jobs)


async def test_the_end_releases_what_is_buffered_and_then_no_job():
    schedule = TextSchedule([120], limit=4096)
    schedule.add("The last words", auto_mode=False)
    schedule.end()
    assert schedule.closing
    job = await schedule.next_job()
    assert job is not None
    assert [item async for item in job if item is not FLUSH] == ["The last words"]
    assert await schedule.next_job() is None
    assert await schedule.next_job() is None
