"""The playground page in a real headless browser: Debian's Chromium driven by Playwright
(no browser is downloaded), against a real `chorus serve`."""

from __future__ import annotations

import shutil
import warnings
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.audio import encoded_voice
from tests.processes import chorus_server

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "install it with: apt-get update && apt-get install -y chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # A microphone that plays a tone, allowed without asking: the page's recorder is tested too.
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
#: Low, so that a too-long text is quick to type.
MAX_INPUT_CHARS = 300
#: What the page says when the browser's media pipeline stops taking chunks.
STALL = "the browser's media pipeline stalled"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("playground")
    (root / "models").mkdir()
    with chorus_server(root / "models", root / "server.log",
                       env={"CHORUS_MAX_INPUT_CHARS": str(MAX_INPUT_CHARS)}) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    # A missing browser is a broken test machine, not a reason to pass: fail and say how to fix it.
    executable = CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")
    if not executable:
        pytest.fail(f"the playground test needs Debian's Chromium at {CHROMIUM}; {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playground test needs Playwright: pip install -e '.[test]' (no browser download is needed)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@contextmanager
def page_on(browser, base: str, init_script: str | None = None) -> Iterator:
    """A fresh browser tab on the page served at `base`, as a first-time visitor opens it."""
    context = browser.new_context()
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    page.set_default_timeout(60_000)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(f"{base}/")
        yield page
    finally:
        context.close()
    # The page must work offline: every request it made went to the Chorus server.
    assert all(url.startswith((base + "/", "blob:", "data:")) for url in requested), requested


def wait_for_models(page) -> None:
    # Models and voices are in once the model list holds a real option.
    page.wait_for_function("() => document.querySelector('#model option')?.value === 'tts-1'")


@pytest.fixture
def page(browser, server) -> Iterator:
    with page_on(browser, server.url) as page:
        wait_for_models(page)
        yield page


def speak(page, text: str, fmt: str = "mp3") -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.fill("#text", text)
    page.select_option("#format", fmt)
    page.click("#speak")
    # Done, or an error: whichever the page shows first.
    try:
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.startsWith('Done')"
            " || !document.querySelector('#error').hidden"
        )
    except PlaywrightTimeoutError:
        state = page.eval_on_selector(
            "#player",
            "a => ({readyState: a.readyState, network: a.networkState, src: a.src, playback: a.dataset.playback})",
        )
        raise AssertionError(
            f"the page never finished: status {page.text_content('#status')!r}, "
            f"error {page.text_content('#error')!r}, player {state}"
        ) from None


def audio_state(page) -> dict:
    """The audio element once it holds playable audio of a known, non-zero length."""
    page.wait_for_function(
        "() => { const a = document.querySelector('#player');"
        " return a.readyState >= 1 && Number.isFinite(a.duration) && a.duration > 0; }"
    )
    return page.eval_on_selector(
        "#player",
        "a => ({readyState: a.readyState, duration: a.duration, error: a.error && a.error.message, src: a.src,"
        " playback: a.dataset.playback})",
    )


def test_page_lists_the_served_models_and_voices(page, server):
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    served = [model["id"] for model in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert models == served
    voices = page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert "en_US-joe-medium" in voices
    assert page.title() == "Chorus playground"
    # Both addresses serve the same page.
    assert httpx.get(f"{server.url}/playground").text == httpx.get(f"{server.url}/").text


def test_speak_streams_playable_mp3_and_offers_the_download(page):
    speak(page, "Hello from the playground. This sentence is spoken by Chorus.")
    assert page.is_hidden("#error"), page.text_content("#error")
    state = audio_state(page)
    assert state["error"] is None
    assert 2.0 < state["duration"] < 10.0, state
    link = page.eval_on_selector("#download", "a => ({href: a.href, name: a.download, hidden: a.hidden})")
    # mp3 plays through Media Source Extensions while it streams, not from the finished file;
    # unless the browser's own pipeline stalls (test_a_stalled_media_pipeline...), which is
    # the browser's fault and said as a warning, not a failure.
    if state["playback"] == f"whole file: {STALL}":
        warnings.warn(f"Chromium's media pipeline stalled; the page played the whole file: {state}", stacklevel=1)
    else:
        assert state["playback"] == "streamed", state
        assert state["src"] != link["href"]
    assert not link["hidden"] and link["href"].startswith("blob:") and link["name"] == "chorus-tts-1.mp3"
    size = page.evaluate("async (href) => (await (await fetch(href)).blob()).size", link["href"])
    assert size > 10_000


def whole_file_state(page) -> dict:
    """audio_state once the player holds the file just made (its link is the download's), not
    the audio an earlier request left in it."""
    page.wait_for_function("() => document.querySelector('#player').src === document.querySelector('#download').href")
    return audio_state(page)


def test_speed_and_a_format_played_from_a_whole_file(page):
    text = "Speed changes how long the same words take to say."
    page.eval_on_selector("#speed", "s => { s.value = '2'; s.dispatchEvent(new Event('input')); }")
    speak(page, text, "wav")
    assert page.is_hidden("#error"), page.text_content("#error")
    fast = whole_file_state(page)["duration"]
    page.eval_on_selector("#speed", "s => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
    speak(page, text, "wav")
    state = whole_file_state(page)
    normal = state["duration"]
    # Chromium cannot stream WAV through Media Source Extensions: the page plays the whole file.
    assert state["playback"] == "whole file: not streamable here", state
    assert state["src"] == page.eval_on_selector("#download", "a => a.href")
    assert fast < normal * 0.7, (fast, normal)


#: A media pipeline that takes a chunk and stays busy with it, never firing `updateend`: what
#: a loaded test machine's Chromium once did for over a minute, leaving the page at "Speaking…".
STALLED_PIPELINE = """
Object.defineProperty(SourceBuffer.prototype, "updating", { get() { return Boolean(this.stalled); } });
SourceBuffer.prototype.appendBuffer = function () { this.stalled = true; };
"""


def test_a_stalled_media_pipeline_does_not_hold_up_the_audio(browser, server):
    with page_on(browser, server.url, STALLED_PIPELINE) as page:
        wait_for_models(page)
        speak(page, "Hello from the playground. This sentence is spoken by Chorus.")
        assert page.is_hidden("#error"), page.text_content("#error")
        state = audio_state(page)
        # The page gave up on streaming and plays the finished file, which it also offers.
        assert state["playback"] == f"whole file: {STALL}", state
        assert state["src"] == page.eval_on_selector("#download", "a => a.href")
        assert state["error"] is None and 2.0 < state["duration"] < 10.0, state


@pytest.mark.parametrize("fmt", ["opus", "aac", "flac"])
def test_every_other_format_the_page_offers_plays(page, fmt):
    speak(page, "Every format in the list must play.", fmt)
    assert page.is_hidden("#error"), page.text_content("#error")
    state = audio_state(page)
    assert state["error"] is None
    assert 1.0 < state["duration"] < 8.0, state
    assert page.eval_on_selector("#download", "a => a.download").endswith((".ogg", ".aac", ".flac"))


@pytest.mark.parametrize(
    "text, expected",
    [("", "'input' must not be empty"), ("x" * (MAX_INPUT_CHARS + 1), f"the limit is {MAX_INPUT_CHARS}")],
    ids=["empty", "too-long"],
)
def test_server_errors_are_shown_in_words(page, text, expected):
    speak(page, text)
    message = page.text_content("#error")
    assert page.is_visible("#error")
    assert expected in message
    assert message.startswith("The server could not speak this text:")
    assert "{" not in message  # the message, not the raw JSON body
    assert page.is_hidden("#download")


def test_a_recorded_and_uploaded_voice_is_saved_and_selected(page, server):
    page.fill("#voice-name", "Grandpa")
    page.click("#record")
    # The fake microphone's tone, until the page says it has recorded 1.5 s of it.
    page.wait_for_function(
        "() => parseFloat(document.querySelector('#voice-status').textContent.replace(/[^0-9.]/g, '')) >= 1.5")
    page.click("#record")
    page.wait_for_function("() => document.querySelector('#voice-status').textContent.startsWith('Recorded')")
    page.set_input_files("#voice-files", files=[{"name": "take.wav", "mimeType": "audio/wav",
                                                 "buffer": encoded_voice(2)}])
    page.click("#save-voice")
    page.wait_for_function("() => document.querySelector('#voice-status').textContent.startsWith('Saved')"
                           " || !document.querySelector('#error').hidden")
    assert page.is_hidden("#error"), page.text_content("#error")
    voice_id = page.input_value("#voice")
    try:
        # Selected with the first model that clones (the example configs, in file-name order).
        assert page.input_value("#model") == "cloned-voice"
        assert page.eval_on_selector("#voice", "s => s.selectedOptions[0].textContent") == "Grandpa"
        voice = httpx.get(f"{server.url}/v1/voices/{voice_id}", timeout=30).json()
        assert voice["name"] == "Grandpa" and voice["category"] == "cloned"
        # Both takes, one after the other: the 2 s upload and at least 1.5 s of recording.
        with wave.open(str(server.models_dir / "voices" / voice_id / "reference.wav")) as reference:
            assert reference.getnframes() / reference.getframerate() > 3.2
    finally:
        httpx.delete(f"{server.url}/v1/voices/{voice_id}", timeout=30)


def test_static_files_outside_the_page_are_not_served(server):
    assert httpx.get(f"{server.url}/playground/static/playground.js").status_code == 200
    response = httpx.get(f"{server.url}/playground/static/..%2Fcli.py")
    assert response.status_code == 404
    assert "message" in response.json()["error"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("playground-keyed")
    (root / "models").mkdir()
    # Keys as an operator sets them: the environment, comma-separated, spaces around.
    with chorus_server(root / "models", root / "server.log", env={"CHORUS_API_KEYS": "first-key, second-key"}) as running:
        yield running


def test_with_api_keys_the_page_asks_for_one_and_then_speaks(browser, keyed_server):
    with page_on(browser, keyed_server.url) as page:
        # The page itself is open; the API behind it is not, and the page says why.
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.text_content("#error")
        page.fill("#api-key", "second-key")
        page.dispatch_event("#api-key", "change")
        wait_for_models(page)
        speak(page, "Hello from a server that wants a key.", "wav")
        assert page.is_hidden("#error"), page.text_content("#error")
        assert 1.0 < audio_state(page)["duration"] < 8.0
    # The key is checked by the server, not only by the page.
    assert httpx.get(f"{keyed_server.url}/v1/models").status_code == 401
    assert httpx.get(f"{keyed_server.url}/v1/models", headers={"x-api-key": "first-key"}).status_code == 200
