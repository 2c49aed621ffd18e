"""What the voice-agent framework tests share (tests/test_agents.py drives LiveKit's plugins,
tests/test_pipecat.py Pipecat's services): the replies they speak, and the length the same text
has when it is synthesised over plain HTTP. (tests/_live.py's ScriptedRunner counts the chunks of
a reply the backend began.)"""

from __future__ import annotations

import httpx

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
#: A phrase of LONG_REPLY's third sentence: a barge-in test holds the reply there (a gate of
#: ScriptedRunner), so that what begins after the barge-in is counted from a known point however
#: long the barge-in takes to reach the server.
HELD_SENTENCE = f"sentence 3 of a long {LONG_MARK}"


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
