"""Fan-out: with `deploy.fan_out` above 1, the chunks of a long text are synthesised by several
backend calls at once, and the audio still arrives in the text's order, even when later chunks
finish first."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
    # Every chunk waits at a gate: three at a time are held at once, then let go latest first, so
    # that completion order is the reverse of text order within each three.
    runner = ScriptedRunner(models, gated=chunks)
    with live_app(configs, models, runner, chunk_chars=60) as url, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{url}/v1/text-to-speech/alloy", params={"output_format": "pcm_22050"},
                             json={"text": text}, timeout=120)
        for start in range(0, len(chunks), 3):
            window = chunks[start:start + 3]
            runner.wait_until(lambda window=window: all(runner.at_gate[chunk] for chunk in window),
                              what=f"chunks {start + 1} to {start + len(window)} synthesised at once")
            for chunk in reversed(window):
                runner.open_gate(chunk)
                runner.wait_until(lambda chunk=chunk: chunk in runner.pcm_by_text, what=f"{chunk!r} made")
        response = answer.result()
    assert response.status_code == 200
    assert runner.most_open >= 3, "the chunks were not synthesised three at once"
    assert runner.begun == len(chunks)
    # Raw PCM at the voice's own rate: the response is exactly the chunks' audio, in order.
    assert response.content == b"".join(runner.pcm_by_text[chunk] for chunk in chunks)
