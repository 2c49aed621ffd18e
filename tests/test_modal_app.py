"""The Modal app (infra/modal_app.py) and the router's Modal runner, offline.

Modal's objects are inspected the way `modal deploy` would send them; the Piper class runs for
real through `.local()`, and the router built for Modal serves speech through that same path, so
only Modal's transport is left unexercised. The network is blocked throughout: nothing here may
need a token or a connection.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from functions import BACKENDS
from functions.config import ConfigError, load_configs
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, worker_build_args
from tests.conftest import decode
from tests.processes import REPO

APP_FILE = REPO / "infra" / "modal_app.py"

# `.local()` stands in for the containers here, with a temporary models directory in place of
# the Volume that Modal warns is not mounted.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")
_counter = itertools.count()

# Loaded into each subprocess: refuses every connection that leaves the machine.
NO_NETWORK = '''
import socket
_connect = socket.socket.connect
def _connect_local(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
        return _connect(self, address)
    raise ConnectionRefusedError(f"network blocked in tests: {address}")
socket.socket.connect = _connect_local
_getaddrinfo = socket.getaddrinfo
def _getaddrinfo_local(host, *args, **kwargs):
    if host in (None, "localhost", "127.0.0.1", "::1"):
        return _getaddrinfo(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, f"network blocked in tests: {host}")
socket.getaddrinfo = _getaddrinfo_local
'''


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)
    monkeypatch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    blocker = tmp_path / "no_network.py"
    blocker.write_text(NO_NETWORK, encoding="utf-8")
    runpy.run_path(str(blocker))  # patches the socket module; monkeypatch restores it


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "home" / ".modal.toml"))


def load_app(monkeypatch, configs_dir: Path, models_dir: Path | None = None):
    """infra/modal_app.py imported afresh, reading `configs_dir`."""
    monkeypatch.setenv("CHORUS_CONFIGS_DIR", str(configs_dir))
    if models_dir is not None:
        monkeypatch.setenv("CHORUS_MODELS_DIR", str(models_dir))
    name = f"chorus_modal_app_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, APP_FILE)
    module = importlib.util.module_from_spec(spec)
    # Modal resolves the generated classes through their module while decorating them.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def write_configs(directory: Path, configs: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for config in configs:
        (directory / f"{config['name']}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory


def definition(cls) -> dict:
    """What `modal deploy` will send for a class's scaling settings, which FunctionInfo does not
    show offline: the values captured by the function's loader (modal is pinned at 1.6.4)."""
    from modal._utils.async_utils import synchronizer

    function = synchronizer._translate_in(cls._get_class_service_function())
    loader = function._load
    return dict(zip(loader.__code__.co_freevars, (c.cell_contents for c in loader.__closure__)))


ALL_BACKENDS = [
    {"name": "voice-a", "backend": "piper", "parameters": {"model": "a.onnx"}},
    {"name": "voice-b", "backend": "piper", "parameters": {"model": "b.onnx"},
     "deploy": {"min_containers": 1, "max_concurrent_inputs": 8}},
    {"name": "xtts", "backend": "coqui", "parameters": {"model": "tts_models/x"},
     "deploy": {"gpu": "T4", "scaledown_window": 120, "max_concurrent_inputs": 2, "timeout": 900}},
    {"name": "vits", "backend": "coqui", "parameters": {"model": "tts_models/y"},
     "deploy": {"gpu": "a10g", "scaledown_window": 600}},
    {"name": "bark", "backend": "bark", "parameters": {"model": "suno/bark"}, "deploy": {"gpu": "A100-80GB"}},
    {"name": "parler", "backend": "parler-tts", "parameters": {"model": "p/q"}, "deploy": {"gpu": "L4"}},
    {"name": "music", "backend": "transformers-musicgen", "parameters": {"model": "m/n"},
     "deploy": {"gpu": "H100:2", "min_containers": 2}},
    {"name": "valle", "backend": "vall-e-x", "deploy": {"gpu": "L40S", "timeout": 1200}},
]


def test_every_backend_gets_a_class_with_the_settings_its_configs_ask_for(
    monkeypatch, tmp_path, no_network, no_token
):
    import modal

    dockerfiles = set()
    from_dockerfile = modal.Image.from_dockerfile

    def recording(path, **options):
        dockerfiles.add((Path(path), Path(options["context_dir"]), tuple(sorted(options["build_args"].items()))))
        return from_dockerfile(path, **options)

    monkeypatch.setattr(modal.Image, "from_dockerfile", recording)
    app = load_app(monkeypatch, write_configs(tmp_path / "configs", ALL_BACKENDS))

    expected = {
        # backend: (gpus, min_containers, scaledown_window, timeout, max concurrent inputs)
        "piper": ([], 1, 300, 600, 4),
        "coqui": ([("A10G", 1)], 0, 600, 900, 2),
        "bark": ([("A100-80GB", 1)], 0, 300, 600, 4),
        "parler-tts": ([("L4", 1)], 0, 300, 600, 4),
        "transformers-musicgen": ([("H100", 2)], 2, 300, 600, 4),
        "vall-e-x": ([("L40S", 1)], 0, 300, 1200, 4),
    }
    assert set(expected) == set(BACKENDS)
    for backend, (gpus, warm, idle, timeout, concurrency) in expected.items():
        cls = getattr(app, BACKENDS[backend][1])
        info = cls._get_class_service_function().info()
        assert info.gpus == gpus, backend
        assert info.timeout == timeout, backend
        assert info.concurrency_info.max_inputs == concurrency, backend
        assert set(info.method_names) == {"describe", "synthesize"}, backend
        assert info.volumes["/models"].name == "chorus-models", backend
        sent = definition(cls)
        assert (sent["min_containers"], sent["scaledown_window"]) == (warm, idle), backend
        assert sent["enable_memory_snapshot"] is True, backend

    web = app.web.info()
    assert web.gpus == []
    assert web.web_info is not None
    assert web.secrets == ["modal.Secret.from_name('chorus-api-key')"]
    # Every image is built as docker compose builds it: the worker Dockerfile with each backend's
    # build arguments, the router's own, the repository as the build context.
    assert dockerfiles == {
        *((REPO / WORKER_DOCKERFILE, REPO, tuple(sorted(worker_build_args(b).items()))) for b in BACKENDS),
        (REPO / ROUTER_DOCKERFILE, REPO, ()),
    }


def test_only_the_backends_the_configs_use_are_deployed(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [{"name": "tts-1", "backend": "piper"}])
    app = load_app(monkeypatch, configs)
    assert set(app.DEPLOY) == {"piper"}
    assert hasattr(app, "PiperBackend") and not hasattr(app, "CoquiBackend")


def test_the_shipped_configs_deploy_every_backend_they_name(monkeypatch, no_network, no_token):
    app = load_app(monkeypatch, REPO / "configs")
    named = {config.backend for config in load_configs(REPO / "configs", REPO / "models")}
    assert set(app.DEPLOY) == named


@pytest.mark.parametrize("gpu", ["X100", "A10G:0", "H100:9", "T4 x2"])
def test_an_unknown_gpu_type_is_a_clear_error(monkeypatch, tmp_path, no_token, gpu):
    configs = write_configs(
        tmp_path / "configs", [{"name": "broken", "backend": "bark", "deploy": {"gpu": gpu}}]
    )
    with pytest.raises(ConfigError) as error:
        load_app(monkeypatch, configs)
    message = str(error.value)
    assert "broken.yaml" in message and "deploy.gpu" in message and gpu in message
    assert "T4" in message and "H100" in message


def run_modal_deploy(tmp_path: Path, configs_dir: Path) -> subprocess.CompletedProcess:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK, encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("MODAL_") and key != "PYTHONPATH"
    }
    env.update(HOME=str(home), PYTHONPATH=str(tmp_path / "site"), CHORUS_CONFIGS_DIR=str(configs_dir))
    modal_cli = Path(sys.executable).with_name("modal")
    return subprocess.run(
        [str(modal_cli), "deploy", str(APP_FILE)], check=False, cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )


def test_modal_deploy_without_a_token_fails_with_modals_own_message(tmp_path):
    result = run_modal_deploy(tmp_path, REPO / "configs")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Token missing" in output, output
    assert "Traceback" not in output and "ImportError" not in output, output


def test_modal_deploy_imports_the_app_first(tmp_path):
    """The token check comes after the import: a bad config stops the deploy with its own error."""
    configs = write_configs(tmp_path / "configs", [{"name": "bad", "backend": "bark", "deploy": {"gpu": "Z9"}}])
    result = run_modal_deploy(tmp_path, configs)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unknown GPU 'Z9'" in output, output
    assert "Token missing" not in output


@pytest.fixture
def piper_app(monkeypatch, tmp_path, no_network, no_token):
    return load_app(monkeypatch, REPO / "configs", tmp_path / "models")


def test_the_piper_class_loads_its_voice_and_yields_real_audio(piper_app, tmp_path):
    voice = piper_app.PiperBackend(model="tts-1")
    described = voice.describe.local()
    assert described == {"sample_rate": 22050, "voices": ["en_US-joe-medium"]}
    # The enter hook put the bundled voice in the models directory (the Volume, on Modal).
    assert (tmp_path / "models" / "en_US-joe-medium.onnx").is_file()
    chunks = list(voice.synthesize.local({"model": "tts-1", "text": "Hello world. This is Chorus on Modal."}))
    assert len(chunks) == 2 and all(isinstance(c, bytes) and len(c) % 2 == 0 for c in chunks)
    pcm = b"".join(chunks)
    audio = decode(pcm, raw="pcm", rate=22050)
    assert 1.5 < audio.duration < 5.0
    assert abs(audio.samples).max() > 0.1  # speech, not silence


def local_lookup(app, calls: list):
    """A lookup like modal.Cls.from_name whose methods run through `.local()`."""

    class Method:
        def __init__(self, method):
            self.remote = self.remote_gen = method.local

    class Instance:
        def __init__(self, obj):
            self.obj = obj

        def __getattr__(self, name):
            return Method(getattr(self.obj, name))

    def lookup(app_name: str, class_name: str):
        calls.append((app_name, class_name))
        cls = getattr(app, class_name)
        return lambda **params: Instance(cls(**params))

    return lookup


def test_the_modal_router_serves_speech_through_the_backend_classes(piper_app, tmp_path):
    from router.app import create_app
    from router.runners.modal import ModalRunner
    from router.settings import Settings

    calls: list = []
    settings = Settings(mode="modal", configs_dir=REPO / "configs", models_dir=tmp_path / "models")
    runner = ModalRunner(settings.modal_app, lookup=local_lookup(piper_app, calls))
    app = create_app(settings, runner=runner)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://chorus") as client,
        ):
            speech = await client.post(
                "/v1/audio/speech",
                json={"model": "tts-1", "input": "Hello from Modal. Two sentences here.",
                      "voice": "alloy", "response_format": "wav"},
            )
            bad_voice = await client.post(
                "/v1/audio/speech",
                json={"model": "tts-1", "input": "Hi.", "voice": "nobody", "response_format": "wav"},
            )
            return speech, bad_voice

    speech, bad_voice = asyncio.run(scenario())
    assert speech.status_code == 200, speech.text
    audio = decode(speech.content)
    assert audio.sample_rate == 22050 and 1.5 < audio.duration < 5.0
    assert calls and all(call == ("chorus", "PiperBackend") for call in calls)
    # The backend's own error comes back as the API's 400, naming the field.
    assert bad_voice.status_code == 400, bad_voice.text
    assert bad_voice.json()["error"]["param"] == "voice"


def test_without_a_token_the_modal_runner_answers_503_naming_the_backend(
    monkeypatch, no_network, no_token
):
    from functions.config import ModelConfig
    from functions.protocol import SynthesisRequest
    from router.errors import BackendUnavailable
    from router.runners.modal import ModalRunner

    runner = ModalRunner("chorus")  # the real modal.Cls.from_name
    config = ModelConfig(name="tts-1", backend="piper")
    with pytest.raises(BackendUnavailable) as error:
        asyncio.run(runner.stream(config, SynthesisRequest(model="tts-1", text="Hi.")))
    assert error.value.status == 503
    assert "piper" in error.value.message and "Token missing" in error.value.message
    assert "modal token new" in error.value.message


def test_modal_errors_map_to_the_routers_errors():
    from modal import exception as modal_errors

    from functions.protocol import (
        BackendError,
        BackendUnavailableError,
        InvalidRequestError,
    )
    from router.errors import BackendUnavailable, InvalidRequest, SynthesisFailed
    from router.runners.modal import ModalRunner

    runner = ModalRunner("chorus")
    cases = [
        (InvalidRequestError("no such speaker", param="voice"), InvalidRequest, "no such speaker"),
        (BackendUnavailableError("not installed"), BackendUnavailable, "backend 'coqui'"),
        (BackendError("out of memory"), SynthesisFailed, "out of memory"),
        (modal_errors.NotFoundError("no such class"), BackendUnavailable, "modal deploy"),
        (modal_errors.ConnectionError("lost"), BackendUnavailable, "lost"),
        (modal_errors.FunctionTimeoutError("too slow"), SynthesisFailed, "too slow"),
        (RuntimeError("boom"), SynthesisFailed, "boom"),
    ]
    for raised, expected, text in cases:
        translated = runner._translate("coqui", raised)
        assert isinstance(translated, expected), raised
        assert text in translated.message, translated.message
    assert runner._translate("coqui", cases[0][0]).param == "voice"


def test_the_router_endpoint_is_the_app_the_router_factory_builds(piper_app, monkeypatch):
    """The asgi_app body, run here: mode modal, the Modal runner, the deployed app's name."""
    from router.runners.modal import ModalRunner

    web = piper_app.web.local()
    assert isinstance(web.state.speech.runner, ModalRunner)
    assert web.state.speech.runner.app_name == piper_app.APP_NAME
    assert web.state.speech.settings.mode == "modal"

