"""ElevenLabs' streaming WebSockets against a real `chorus serve`: `stream-input` (one stream of
text in, audio and character timings out) and `multi-stream-input` (several contexts on one
socket, closed one by one, a barge-in stopping one at once), spoken to by ElevenLabs' own SDK
over wss:// and by a plain WebSocket client that checks the wire schema, the timings and every
refusal (an error message, then close code 1008 where ElevenLabs closes)."""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from itertools import zip_longest
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from tests.audio import LONGER_TEXT, PIPER_RATE, SHORT_SECONDS, SHORT_TEXT, assert_speech, decode, pcm_seconds
from tests.processes import REPO, chorus_command, free_port, running

websockets = pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

VOICE = "en_US-joe-medium"
KEY = "socket-secret"
#: ElevenLabs' close code for a refusal; 1000 ends a socket normally.
POLICY_VIOLATION = 1008
#: Long enough that speaking all of it takes far longer than a barge-in: about 45 s of audio.
VERY_LONG_TEXT = " ".join([LONGER_TEXT] * 5)

Message = dict | str | bytes


# --- helpers -----------------------------------------------------------------------------------


def socket_url(base: str, endpoint: str = "stream-input", voice: str = VOICE, **query: object) -> str:
    scheme = "wss" if base.startswith("https") else "ws"
    url = f"{scheme}{base.removeprefix('https').removeprefix('http')}/v1/text-to-speech/{voice}/{endpoint}"
    params = {name: str(value).lower() if isinstance(value, bool) else value for name, value in query.items()}
    return f"{url}?{urlencode(params)}" if params else url


#: Seconds a test gives a socket to open (TCP, TLS and the WebSocket handshake) and to close: a
#: lost handshake fails its test in seconds, with a message, instead of at pytest's 300 s.
OPEN_TIMEOUT, CLOSE_TIMEOUT = 20, 10


class BoundedConnection(ClientConnection):
    """websockets' sync client, whose time-outs hold over TLS too. When the opening handshake
    times out, the client closes the socket and then joins its reader thread; but that thread
    may be blocked inside an SSL read (TLS 1.3 session tickets made the socket readable, and the
    read then waits for data that never comes), and closing a descriptor does not wake a thread
    blocked on it: the join waited as long as the server kept the connection. Shutting the socket
    down first does wake it."""

    def close_socket(self) -> None:
        with suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        super().close_socket()


#: `websockets.sync.client.connect` with this module's bounds.
bounded_connect = functools.partial(connect, open_timeout=OPEN_TIMEOUT, close_timeout=CLOSE_TIMEOUT,
                                    create_connection=BoundedConnection)


@contextmanager
def opened(url: str, headers: dict[str, str] | None = None, **kwargs: object) -> Iterator[ClientConnection]:
    with ExitStack() as stack:
        try:
            # proxy=None: a proxy in the environment must not stand between us and loopback.
            ws = stack.enter_context(bounded_connect(url, additional_headers=headers or {}, proxy=None,
                                                     max_size=None, **kwargs))
        except TimeoutError as exc:
            pytest.fail(f"no WebSocket handshake with {url} within {OPEN_TIMEOUT} s: {exc}")
        yield ws


@pytest.fixture
def bounded_sdk(monkeypatch):
    """ElevenLabs' SDK opens its sockets through the same bounded client."""
    import elevenlabs.realtime_tts

    monkeypatch.setattr(elevenlabs.realtime_tts, "connect", bounded_connect)


def send(ws: ClientConnection, *messages: Message) -> None:
    for message in messages:
        ws.send(message if isinstance(message, str | bytes) else json.dumps(message))


def receive_until_closed(ws: ClientConnection, timeout: float = 90) -> list[dict]:
    """Every message until the server closes the socket (it must, within `timeout`)."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = ws.recv(timeout=max(deadline - time.monotonic(), 0.01))
        except ConnectionClosed:
            return received
        except TimeoutError:
            pytest.fail(f"the server did not close the socket within {timeout} s; got {summary(received)}")
        received.append(json.loads(raw))


def receive_until(ws: ClientConnection, done, timeout: float = 60) -> list[dict]:
    """Messages until one satisfies `done` (included)."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            pytest.fail(f"the awaited message did not come within {timeout} s; got {summary(received)}")
        received.append(message)
        if done(message):
            return received


def converse(url: str, messages: Sequence[Message], headers: dict[str, str] | None = None,
             **kwargs: object) -> tuple[list[dict], int | None]:
    """Send `messages` (stopping if the server closes first), read until the server closes;
    returns what it sent and its close code."""
    with opened(url, headers, **kwargs) as ws:
        with suppress(ConnectionClosed):
            send(ws, *messages)
        received = receive_until_closed(ws)
        return received, ws.close_code


def finish(ws: ClientConnection, *contexts: str) -> tuple[list[dict], int | None]:
    """Messages until every one of `contexts` has its final message, then a close_socket (which
    stops whatever is still being made) and what follows until the server closes; and its close
    code."""
    waiting = set(contexts)
    received: list[dict] = []
    while waiting:
        received += receive_until(ws, lambda m: bool(m.get("isFinal")))
        waiting.discard(received[-1].get("contextId"))
    send(ws, {"close_socket": True})
    received += receive_until_closed(ws)
    return received, ws.close_code


def summary(messages: list[dict]) -> list[dict]:
    """Messages with their audio shortened, for failure output."""
    return [{**m, "audio": f"<{len(m['audio'])} b64>"} if m.get("audio") else m for m in messages]


def for_context(messages: list[dict], context: str | None) -> list[dict]:
    return [m for m in messages if context is None or m.get("contextId") == context]


def audio_of(messages: list[dict], context: str | None = None) -> bytes:
    return b"".join(base64.b64decode(m["audio"]) for m in for_context(messages, context) if m.get("audio"))


def spoken_text(messages: list[dict], context: str | None = None, key: str = "alignment") -> str:
    return "".join("".join(m[key]["chars"]) for m in for_context(messages, context) if m.get(key))


def finals(messages: list[dict], context: str | None = None) -> list[dict]:
    return [m for m in for_context(messages, context) if m.get("isFinal")]


def assert_error(message: dict, code: str, context: str | None = None) -> None:
    """ElevenLabs' socket error: `{"message", "error", "code": 1008}` (+ `contextId`)."""
    expected = {"message", "error", "code"} | ({"contextId"} if context else set())
    assert set(message) == expected, message
    assert message["error"] == code, message
    assert message["code"] == POLICY_VIOLATION, message
    assert isinstance(message["message"], str) and message["message"], message
    if context:
        assert message["contextId"] == context, message


def assert_refused(received: list[dict], close_code: int | None, code: str) -> None:
    """One error message, no audio, then close 1008."""
    assert len(received) == 1, summary(received)
    assert_error(received[0], code)
    assert close_code == POLICY_VIOLATION


def assert_spoke(received: list[dict], close_code: int | None, text: str, seconds=SHORT_SECONDS,
                 fmt: str = "pcm", rate: int = PIPER_RATE) -> None:
    """A whole stream-input answer: audio of `text`, its characters, isFinal last, close 1000."""
    assert close_code == 1000, summary(received)
    assert received[-1] == {"isFinal": True}, summary(received)
    assert len(finals(received)) == 1
    assert spoken_text(received).strip() == text.strip()
    assert_speech(decode(audio_of(received), raw="pcm", rate=rate) if fmt == "pcm" else decode(audio_of(received)),
                  seconds)


def tts_messages(text: str, **first: object) -> list[dict]:
    return [{"text": " ", **first}, {"text": text + " "}, {"text": ""}]


def context_messages(context: str, text: str) -> list[dict]:
    """A whole context: its opening, its text, an empty flush (no more text) and its close."""
    return [
        {"text": " ", "context_id": context},
        {"text": text + " ", "context_id": context},
        {"text": "", "context_id": context, "flush": True},
        {"context_id": context, "close_context": True},
    ]


def start_server(tmp: Path, env: dict[str, str], *extra: str, scheme: str = "http", verify=True):
    models = tmp / "models"
    models.mkdir(exist_ok=True)
    port = free_port()
    command = chorus_command("serve", "--port", str(port), "--models", str(models), "--log-level", "warning", *extra)
    environment = {key: value for key, value in os.environ.items() if key not in ("HOST", "PORT")}
    return port, running(command, env={**environment, **env}, cwd=REPO, log=tmp / "serve.log",
                         ready_url=f"{scheme}://127.0.0.1:{port}/readyz", timeout=120, name="chorus serve",
                         verify=verify)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with API keys, a 100-character input limit and two contexts per socket."""
    tmp = tmp_path_factory.mktemp("keyed")
    port, server = start_server(tmp, {
        "CHORUS_API_KEYS": KEY, "CHORUS_MAX_INPUT_CHARS": "100", "CHORUS_WEBSOCKET_MAX_CONTEXTS": "2",
    })
    with server:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`chorus serve --ssl-certfile/--ssl-keyfile` with a self-signed certificate for 127.0.0.1,
    an API key, and room for one socket at a time; yields its https URL and the certificate."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port, server = start_server(tmp, {"CHORUS_API_KEYS": KEY, "CHORUS_WEBSOCKET_MAX_SOCKETS": "1"},
                                "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), scheme="https",
                                verify=ssl.create_default_context(cafile=str(cert)))
    with server:
        yield f"https://127.0.0.1:{port}", cert


# --- ElevenLabs' SDK over wss:// ---------------------------------------------------------------


def test_the_sdks_convert_realtime_speaks_over_wss(tls, monkeypatch, bounded_sdk):
    """The SDK always dials wss:// and takes no SSL context: the certificate is trusted the way a
    user would (SSL_CERT_FILE); its key goes in the xi-api-key header."""
    from elevenlabs.client import ElevenLabs

    url, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = ElevenLabs(api_key=KEY, base_url=url)

    def words() -> Iterator[str]:
        yield from (word + " " for word in SHORT_TEXT.split())

    data = b"".join(client.text_to_speech.convert_realtime(voice_id=VOICE, text=words()))
    audio = decode(data)
    assert audio.codec in ("mp3", "mp3float") and audio.sample_rate == 44100
    assert_speech(audio)


def test_the_sdk_sees_a_refusal_as_an_api_error(tls, monkeypatch, bounded_sdk):
    from elevenlabs.client import ElevenLabs
    from elevenlabs.core.api_error import ApiError

    url, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = ElevenLabs(api_key="not-the-key", base_url=url)
    with pytest.raises(ApiError) as caught:
        list(client.text_to_speech.convert_realtime(voice_id=VOICE, text=iter(["Hello there. "])))
    assert caught.value.status_code == POLICY_VIOLATION
    assert caught.value.body["error"] == "invalid_api_key"


def test_a_second_socket_past_the_limit_is_refused(tls):
    url, cert = tls
    trusted = ssl.create_default_context(cafile=str(cert))
    headers = {"xi-api-key": KEY}
    with opened(socket_url(url, output_format="pcm_22050"), headers, ssl=trusted) as first:
        send(first, {"text": " "})
        received, close_code = converse(socket_url(url), [{"text": " "}], headers, ssl=trusted)
        assert_refused(received, close_code, "max_sockets_exceeded")
        # The first one is untouched.
        send(first, *tts_messages(SHORT_TEXT)[1:])
        assert_spoke(receive_until_closed(first), first.close_code, SHORT_TEXT)
    # A socket the server has closed gave its place back before its close frame went out: the
    # next one is served at once.
    received, close_code = converse(socket_url(url, output_format="pcm_22050"), tts_messages(SHORT_TEXT),
                                    headers, ssl=trusted)
    assert_spoke(received, close_code, SHORT_TEXT)


def test_the_tls_server_sends_no_session_ticket_for_a_threaded_client_to_read(tls):
    """A TLS 1.3 session ticket arrives just after the handshake, while a threaded client
    (websockets' sync client, ElevenLabs' SDK) writes its upgrade request from one thread and its
    reader thread reads the ticket from the same SSL object, which OpenSSL does not allow: about
    one socket in a thousand lost its upgrade request and hung. `chorus serve` sends no tickets."""
    url, cert = tls
    port = int(url.rsplit(":", 1)[1])
    trusted = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            trusted.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := connection.recv(65536):  # to the end: any ticket sent has been read by then
            answer += data
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert connection.version() == "TLSv1.3"
        assert not connection.session.has_ticket, "the server issued a TLS session ticket"


# --- stream-input ------------------------------------------------------------------------------


def test_stream_input_speaks_before_the_text_is_finished(server):
    """An LLM's words, one message each, auto_mode: the first sentence is heard while the rest
    is still being written; every message's alignment is that message's audio, and all of
    them together are the text."""
    words = LONGER_TEXT.split(" ")
    first_sentence = next(i for i, word in enumerate(words) if word.endswith(".")) + 1
    url = socket_url(server.url, output_format="pcm_22050", auto_mode=True, sync_alignment=True)
    with opened(url) as ws:
        send(ws, {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}})
        send(ws, *({"text": word + " "} for word in words[:first_sentence]))
        # Nothing more is sent until audio comes: it must come for the first sentence alone.
        early = receive_until(ws, lambda message: bool(message.get("audio")))
        send(ws, *({"text": word + " "} for word in words[first_sentence:]))
        send(ws, {"text": ""})
        received = early + receive_until_closed(ws)
        close_code = ws.close_code
    assert spoken_text(early).strip() == " ".join(words[:first_sentence])
    assert_spoke(received, close_code, LONGER_TEXT, seconds=(6.0, 20.0))
    assert spoken_text(received, key="normalizedAlignment").strip() == LONGER_TEXT
    for message in received[:-1]:
        assert set(message) == {"audio", "isFinal", "alignment", "normalizedAlignment"}, summary([message])
        assert message["isFinal"] is None
        assert message["alignment"], "sync_alignment: every message carries its characters"
        assert message["normalizedAlignment"] == message["alignment"]
        alignment = message["alignment"]
        starts, durations = alignment["charStartTimesMs"], alignment["charDurationsMs"]
        assert len(alignment["chars"]) == len(starts) == len(durations) > 0
        assert all(len(char) == 1 for char in alignment["chars"])
        assert starts[0] == 0, "times start at the message's own audio"
        assert starts == sorted(starts) and min(durations) >= 0
        assert all(start + duration <= later + 1 for start, duration, later in zip(starts, durations, starts[1:]))
        seconds = pcm_seconds(base64.b64decode(message["audio"] or ""), PIPER_RATE)
        assert abs(sum(durations) - seconds * 1000) <= 5, (sum(durations), seconds, alignment["chars"])
        assert abs(starts[-1] + durations[-1] - seconds * 1000) <= 5


def test_stream_input_with_a_chunk_schedule_and_flushes(server):
    """Without auto_mode, text is held until the schedule's length or a flush; mp3 by default."""
    first_part, second_part = "Hello world. This is a test", "of Chorus."
    messages = [
        {"text": " ", "generation_config": {"chunk_length_schedule": [50, 80]}},
        {"text": first_part + " ", "try_trigger_generation": True},
        {"text": second_part + " ", "flush": True},
        {"text": ""},
    ]
    received, close_code = converse(socket_url(server.url), messages)
    assert_spoke(received, close_code, SHORT_TEXT, fmt="mp3")
    assert decode(audio_of(received)).sample_rate == 44100


# --- multi-stream-input ------------------------------------------------------------------------


def test_interleaved_contexts_each_get_their_own_audio(server):
    texts = {
        "first": "Hello world. This is the first context speaking.",
        "second": "And here is the second one, with words of its own.",
    }
    opening = [{"text": " ", "context_id": context} for context in texts]
    words = {context: text.split(" ") for context, text in texts.items()}
    interleaved = [
        {"text": word + " ", "context_id": context}
        for pair in zip_longest(*(words[context] for context in texts))
        for context, word in zip(texts, pair, strict=True)
        if word is not None
    ]
    closing = [message for context in texts for message in context_messages(context, "")[2:]]
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_24000", sync_alignment=True)
    with opened(url) as ws:
        send(ws, *opening, *interleaved, *closing)
        received, close_code = finish(ws, *texts)
    assert close_code == 1000, summary(received)
    assert all(message.get("contextId") in texts for message in received), summary(received)
    for context, text in texts.items():
        mine = for_context(received, context)
        assert mine[-1] == {"isFinal": True, "contextId": context}, summary(mine)
        assert len(finals(mine)) == 1
        assert spoken_text(mine).strip() == text
        assert_speech(decode(audio_of(mine), raw="pcm", rate=24000), (1.5, 6.0))
        for message in mine[:-1]:
            assert set(message) == {"audio", "isFinal", "alignment", "normalizedAlignment", "contextId"}


def test_a_barge_in_stops_one_context_and_the_other_finishes(server):
    """close_context on a context whose text was not ended (no empty flush) is a barge-in: its
    isFinal comes at once, far short of its text's audio, and nothing of it follows; a context
    beside it, whose text was ended, still speaks all of it."""
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_22050", sync_alignment=True,
                     auto_mode=True)
    with opened(url) as ws:
        send(ws, {"text": " ", "context_id": "kept"}, {"text": " ", "context_id": "barged"})
        send(ws, {"text": LONGER_TEXT + " ", "context_id": "kept"}, {"text": "", "context_id": "kept", "flush": True})
        send(ws, {"text": VERY_LONG_TEXT + " ", "context_id": "barged", "flush": True})
        before = receive_until(ws, lambda m: m.get("contextId") == "barged" and bool(m.get("audio")))
        send(ws, {"context_id": "barged", "close_context": True}, {"context_id": "kept", "close_context": True})
        rest, close_code = finish(ws, "barged", "kept")
        received = before + rest
    assert close_code == 1000, summary(received)

    barged = for_context(received, "barged")
    assert barged[-1] == {"isFinal": True, "contextId": "barged"}, "nothing of it after its isFinal"
    assert len(finals(barged)) == 1
    kept = for_context(received, "kept")
    assert kept[-1] == {"isFinal": True, "contextId": "kept"}
    assert spoken_text(kept).strip() == LONGER_TEXT
    kept_seconds = pcm_seconds(audio_of(kept), PIPER_RATE)
    assert_speech(decode(audio_of(kept), raw="pcm", rate=PIPER_RATE), (6.0, 20.0))
    # What the whole long text would have given, at the voice's pace in the kept context.
    whole = kept_seconds * len(VERY_LONG_TEXT) / len(LONGER_TEXT)
    heard = pcm_seconds(audio_of(barged), PIPER_RATE)
    assert 0 < heard < whole / 3, f"{heard:.1f} s of the barged context's audio, of about {whole:.1f} s"
    assert len(spoken_text(barged)) < len(VERY_LONG_TEXT) / 3


def test_keep_alives_make_no_audio_and_keep_the_socket_open(server):
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_22050", inactivity_timeout=2)
    with opened(url) as ws:
        send(ws, {"text": ""})  # before any context
        send(ws, {"text": " ", "context_id": "c"})
        for _ in range(6):  # three seconds, past the two-second inactivity timeout
            send(ws, {"text": "", "context_id": "c"})
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)
        send(ws, *context_messages("c", SHORT_TEXT)[1:])
        received, close_code = finish(ws, "c")
    assert close_code == 1000, summary(received)
    assert spoken_text(received, "c").strip() == SHORT_TEXT
    assert received[-1] == {"isFinal": True, "contextId": "c"}
    assert_speech(decode(audio_of(received, "c"), raw="pcm", rate=PIPER_RATE))


def test_close_socket_stops_every_context_and_closes(server):
    """The client is done with the socket (Pipecat's hang-up): what is still being made is not
    heard, each context still open gets its final message, and the socket closes normally."""
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_22050", auto_mode=True)
    with opened(url) as ws:
        send(ws, {"text": " ", "context_id": "a"}, {"text": VERY_LONG_TEXT + " ", "context_id": "a", "flush": True},
             {"text": " ", "context_id": "b"}, {"text": VERY_LONG_TEXT + " ", "context_id": "b"},
             {"text": "", "context_id": "b", "flush": True}, {"context_id": "b", "close_context": True})
        before = receive_until(ws, lambda m: m.get("contextId") == "a" and bool(m.get("audio")))
        send(ws, {"close_socket": True})
        received = before + receive_until_closed(ws)
        close_code = ws.close_code
    assert close_code == 1000, summary(received)
    assert finals(received, "a") == [{"isFinal": True, "contextId": "a"}]
    assert finals(received, "b") == [{"isFinal": True, "contextId": "b"}]
    for context in ("a", "b"):
        assert len(spoken_text(received, context)) < len(VERY_LONG_TEXT) / 3, context


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["stream-input", "multi-stream-input"])
@pytest.mark.parametrize("query, code", [
    ({"output_format": "wav_7"}, "invalid_request"),
    ({"output_format": "pcm_12345"}, "invalid_request"),
    ({"model_id": "no-such-model"}, "model_not_found"),
    ({"inactivity_timeout": 500}, "invalid_request"),
    ({"inactivity_timeout": "soon"}, "invalid_request"),
    ({"seed": -1}, "invalid_request"),
])
def test_a_socket_that_cannot_be_served_is_refused_before_any_text(server, endpoint, query, code):
    with opened(socket_url(server.url, endpoint, **query)) as ws:
        received = receive_until_closed(ws, timeout=30)  # nothing sent: the refusal comes anyway
        assert_refused(received, ws.close_code, code)


@pytest.mark.parametrize("endpoint", ["stream-input", "multi-stream-input"])
def test_an_unknown_voice_is_refused_at_connect(server, endpoint):
    """ElevenLabs refuses a voice it does not have as the socket opens, before any text: its
    clients expect voice_not_found, then the close (1008)."""
    received, close_code = converse(socket_url(server.url, endpoint, "no-such-voice"), [])
    assert received, "no answer at all"
    assert_error(received[0], "voice_not_found")
    assert "no-such-voice" in received[0]["message"] and "en_US-joe-medium" in received[0]["message"]
    assert len(received) == 1, summary(received)
    assert close_code == POLICY_VIOLATION


@pytest.mark.parametrize("endpoint, messages", [
    ("stream-input", [{"text": " "}, {"text": "Hello there. ", "flush": True}]),
    ("multi-stream-input", [{"text": " ", "context_id": "a"}, {"text": "Hello there. ", "context_id": "a", "flush": True}]),
])
def test_a_voice_only_synthesis_can_judge_is_refused_with_its_first_text(server, endpoint, messages):
    """A voice that is no plain name (a mix, a description) is the backend's to judge: the
    refusal comes with the first text, and the socket is closed (1008) all the same."""
    url = socket_url(server.url, endpoint, "voices/nobody.wav", inactivity_timeout=3)
    received, close_code = converse(url, messages)
    assert received, "no answer at all"
    assert_error(received[0], "voice_not_found", received[0].get("contextId"))
    assert len(received) == 1, summary(received)
    assert close_code == POLICY_VIOLATION


def test_a_first_message_that_is_not_json_is_refused(server):
    received, close_code = converse(socket_url(server.url), ["Hello there."])
    assert_refused(received, close_code, "invalid_message")


def test_bad_messages_later_are_errors_and_the_socket_goes_on(server):
    messages = [
        {"text": " "},
        "this is not JSON",
        {"text": 5},
        ["not", "an", "object"],
        {"text": SHORT_TEXT + " "},
        {"text": ""},
    ]
    received, close_code = converse(socket_url(server.url, output_format="pcm_22050"),
                                    [m if not isinstance(m, list) else json.dumps(m) for m in messages])
    errors = [m for m in received if "error" in m]
    assert len(errors) == 3, summary(received)
    for error in errors:
        assert_error(error, "invalid_message")
    assert "text" in errors[1]["message"]
    assert_spoke([m for m in received if "error" not in m], close_code, SHORT_TEXT)


def test_closing_an_unknown_context_is_an_error(server):
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_22050")
    messages = [
        {"context_id": "nobody", "close_context": True},
        {"text": "No context id at all. "},
        *context_messages("real", SHORT_TEXT),
    ]
    with opened(url) as ws:
        send(ws, *messages)
        received, close_code = finish(ws, "real")
    assert close_code == 1000
    assert_error(received[0], "context_not_found")
    assert "nobody" in received[0]["message"]
    assert_error(received[1], "invalid_message")
    assert spoken_text(received, "real").strip() == SHORT_TEXT
    assert finals(received, "real") == [{"isFinal": True, "contextId": "real"}]


@pytest.mark.parametrize("endpoint", ["stream-input", "multi-stream-input"])
def test_an_idle_socket_times_out(server, endpoint):
    with opened(socket_url(server.url, endpoint, inactivity_timeout=1)) as ws:
        received = receive_until_closed(ws, timeout=30)
        assert_refused(received, ws.close_code, "input_timeout_exceeded")


def test_the_idle_time_counts_from_the_end_of_the_servers_speech(server):
    """A client that flushed a long text and waits is not idle while the server still speaks it:
    it hears all of it, then the socket times out a second after the last audio."""
    url = socket_url(server.url, "multi-stream-input", output_format="pcm_22050", inactivity_timeout=1)
    with opened(url) as ws:
        # About 45 s of speech: several seconds to make, far more than the idle time.
        send(ws, {"text": " ", "context_id": "c"}, {"text": VERY_LONG_TEXT + " ", "context_id": "c", "flush": True})
        received = receive_until_closed(ws, timeout=120)
        close_code = ws.close_code
    assert close_code == POLICY_VIOLATION
    assert_error(received[-1], "input_timeout_exceeded")
    assert spoken_text(received[:-1], "c").strip() == VERY_LONG_TEXT
    assert_speech(decode(audio_of(received[:-1], "c"), raw="pcm", rate=PIPER_RATE), (30.0, 90.0))


@pytest.mark.parametrize("endpoint, opening", [
    ("stream-input", {"text": " "}), ("multi-stream-input", {"text": " ", "context_id": "a"})])
def test_a_binary_frame_is_answered_with_an_error(server, endpoint, opening):
    """Messages are JSON text: a binary frame first refuses the socket (1008); later it is an
    error message, and the socket goes on."""
    first, close_code = converse(socket_url(server.url, endpoint, output_format="pcm_22050"), [b"\x00\x01binary"])
    assert_refused(first, close_code, "invalid_message")
    assert "binary" in first[0]["message"]
    context = opening.get("context_id")
    ending = [{"text": "", "flush": True, "context_id": "a"}, {"close_context": True, "context_id": "a"}] \
        if context else [{"text": ""}]
    with opened(socket_url(server.url, endpoint, output_format="pcm_22050")) as ws:
        send(ws, opening)
        ws.send(b"\x00\x01binary")
        send(ws, {**opening, "text": SHORT_TEXT + " "}, *ending)
        received = receive_until_closed(ws) if not context else finish(ws, "a")[0]
    assert_error(received[0], "invalid_message")
    assert spoken_text(received[1:], context).strip() == SHORT_TEXT


def test_a_lone_surrogate_in_a_message_is_answered_with_an_error(server):
    url = socket_url(server.url, output_format="pcm_22050")
    with opened(url) as ws:
        send(ws, {"text": " "})
        ws.send('{"text": "\\ud800 broken "}')
        send(ws, {"text": SHORT_TEXT + " "}, {"text": ""})
        received = receive_until_closed(ws)
        close_code = ws.close_code
    assert_error(received[0], "invalid_request")
    assert "surrogate" in received[0]["message"]
    assert_spoke(received[1:], close_code, SHORT_TEXT)


def test_a_socket_waiting_for_more_text_times_out(server):
    url = socket_url(server.url, output_format="pcm_22050", inactivity_timeout=2)
    with opened(url) as ws:
        send(ws, {"text": " "}, {"text": "Hello there. ", "flush": True})
        received = receive_until_closed(ws, timeout=30)
        close_code = ws.close_code
    assert close_code == POLICY_VIOLATION
    assert_error(received[-1], "input_timeout_exceeded")
    assert spoken_text(received[:-1]).strip() == "Hello there."


def test_the_server_is_healthy_after_the_bad_sockets(server):
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    response = httpx.post(f"{server.url}/v1/text-to-speech/{VOICE}", json={"text": SHORT_TEXT}, timeout=60)
    assert response.status_code == 200, response.text
    assert_speech(decode(response.content))
    received, close_code = converse(socket_url(server.url, output_format="pcm_22050"), tts_messages(SHORT_TEXT))
    assert_spoke(received, close_code, SHORT_TEXT)


# --- API keys and limits -----------------------------------------------------------------------


@pytest.mark.parametrize("headers, query, first", [
    ({}, {}, {}),
    ({"xi-api-key": "wrong"}, {}, {}),
    ({}, {"authorization": "wrong"}, {}),
    ({}, {}, {"xi-api-key": "wrong"}),
], ids=["none", "wrong-header", "wrong-query", "wrong-in-message"])
def test_a_socket_without_a_good_key_is_refused_before_any_audio(keyed, headers, query, first):
    url = socket_url(keyed, output_format="pcm_22050", **query)
    received, close_code = converse(url, tts_messages(SHORT_TEXT, **first), headers)
    assert_refused(received, close_code, "invalid_api_key")


@pytest.mark.parametrize("headers, query, first", [
    ({"xi-api-key": KEY}, {}, {}),
    ({"Authorization": f"Bearer {KEY}"}, {}, {}),
    ({}, {"authorization": KEY}, {}),
    ({}, {"authorization": f"Bearer {KEY}"}, {}),
    ({}, {}, {"xi-api-key": KEY}),
    ({}, {}, {"xi_api_key": KEY}),
    ({}, {}, {"authorization": f"Bearer {KEY}"}),
], ids=["header", "bearer-header", "query", "bearer-query", "message", "message-underscore", "message-authorization"])
def test_the_key_is_taken_wherever_elevenlabs_takes_it(keyed, headers, query, first):
    url = socket_url(keyed, output_format="pcm_22050", **query)
    received, close_code = converse(url, tts_messages(SHORT_TEXT, **first), headers)
    assert_spoke(received, close_code, SHORT_TEXT)


def test_a_message_over_the_input_limit_is_an_error_and_the_socket_goes_on(keyed):
    too_long = "word " * 30  # 150 characters; the limit is 100
    messages = [{"text": " ", "xi-api-key": KEY}, {"text": too_long}, {"text": SHORT_TEXT + " "}, {"text": ""}]
    received, close_code = converse(socket_url(keyed, output_format="pcm_22050"), messages)
    assert_error(received[0], "invalid_request")
    assert "100" in received[0]["message"]
    assert_spoke(received[1:], close_code, SHORT_TEXT)


def test_a_long_stream_within_the_limit_per_message_is_spoken_whole(keyed):
    """The limit is per message: a stream longer than it, sent in pieces, is spoken in full."""
    sentences = LONGER_TEXT.replace(". ", ".|").split("|")
    assert len(LONGER_TEXT) > 100 and max(map(len, sentences)) < 100
    messages = [{"text": " ", "xi-api-key": KEY}, *({"text": s + " "} for s in sentences), {"text": ""}]
    received, close_code = converse(socket_url(keyed, output_format="pcm_22050"), messages)
    assert_spoke(received, close_code, LONGER_TEXT, seconds=(6.0, 20.0))


def test_a_context_past_the_limit_is_refused(keyed):
    url = socket_url(keyed, "multi-stream-input", output_format="pcm_22050")
    with opened(url, {"xi-api-key": KEY}) as ws:
        send(ws, {"text": " ", "context_id": "a"}, {"text": " ", "context_id": "b"}, {"text": " ", "context_id": "c"})
        refusal = receive_until(ws, lambda m: "error" in m)
        assert len(refusal) == 1
        assert_error(refusal[0], "max_active_conversations")
        # The two open ones still work; once one has ended, a third may open.
        send(ws, *context_messages("a", "First context.")[1:])
        receive_until(ws, lambda m: m.get("isFinal") and m.get("contextId") == "a")
        send(ws, *context_messages("c", "Third context."), *context_messages("b", "Second context.")[1:])
        received, close_code = finish(ws, "c", "b")
    assert close_code == 1000, summary(received)
    assert not [m for m in received if "error" in m], summary(received)
    assert spoken_text(received, "c").strip() == "Third context."
    assert spoken_text(received, "b").strip() == "Second context."
