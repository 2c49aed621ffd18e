"""Fan-out: with `deploy.fan_out` above 1, the chunks of a long text are synthesised by several
backend calls at once, and the audio still arrives in the text's order, even when later chunks
finish first."""

from __future__ import annotations

import httpx

from router.chunking import chunk_text
from tests._live import ScriptedRunner, live_app, piper_setup, write_config

SENTENCES = [f"Part {n} of a story told in order." for n in range(1, 7)]


def test_chunks_run_in_parallel_and_arrive_in_order(tmp_path):
    configs, models = piper_setup(tmp_path)
    write_config(configs, fan_out=3)
    text = " ".join(SENTENCES)
    chunks = chunk_text(text, 60)
    assert len(chunks) == len(SENTENCES)
    # Earlier chunks are held back longest, so completion order is the reverse of text order.
    delays = {chunk: 0.2 * (len(chunks) - i) for i, chunk in enumerate(chunks)}
    runner = ScriptedRunner(models, chunk_delay=delays)
    with live_app(configs, models, runner, chunk_chars=60) as url:
        response = httpx.post(
            f"{url}/v1/text-to-speech/alloy", params={"output_format": "pcm_22050"},
            json={"text": text}, timeout=60,
        )
    assert response.status_code == 200
    assert runner.most_open >= 2, "no two chunks were ever synthesised at once"
    assert runner.begun == len(chunks)
    # Raw PCM at the voice's own rate: the response is exactly the chunks' audio, in order.
    assert response.content == b"".join(runner.pcm_by_text[chunk] for chunk in chunks)
