"""`modal deploy infra/modal_app.py`, end to end and offline: the real client (modal 1.6.4) runs
`modal.runner.deploy_app` (what `modal deploy` calls) against a Modal API server of our own
(tests/modal_server.py), which builds no image but checks each Dockerfile layer as Modal's builder
would and records every layer, uploaded file and function definition the client sent.

What is asserted is what Modal must receive for the deploy to work: the router's and each
backend's image built from its Dockerfile, rendered for Modal (functions.images.modal_dockerfile),
with every COPY source among the files the client uploaded, running as root with the app's
settings whatever the workspace's image builder version; each backend class defined as the
router's Modal runner calls it; the per-model settings `keep_models_warm` sends. The last tests check the server
itself: that it fails what Modal fails.

Each deploy imports the app afresh: the client hydrates the app's module-level objects (its
Volume, its Secret) once, with the ids of the server it first talked to.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from functions import BACKENDS
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, modal_dockerfile, worker_build_args
from tests.modal_offline import ALL_BACKENDS, APP_FILE, NO_NETWORK, import_file, load_app, write_configs
from tests.modal_server import ModalRecorder, build_context, modal_server
from tests.processes import REPO

pytestmark = pytest.mark.timeout(120)

SECRETS = {"chorus-api-key": {"CHORUS_API_KEYS": "test-key"}}

#: What images/worker/install.sh reads from a backend's folder, where the folder has it.
INSTALLED = ("requirements.txt", "requirements-gpu.txt", "system-packages.txt")

#: The image builder versions modal 1.6.4 builds with that a workspace may be on.
BUILDER_VERSIONS = ["2024.10", "2025.06", "2026.10"]


def gpu_wanted(backend: str) -> bool:
    return any(config.get("deploy", {}).get("gpu") for config in ALL_BACKENDS if config["backend"] == backend)


def deploy(app) -> None:
    import modal.runner

    modal.runner.deploy_app(app.app, name=app.APP_NAME)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rendered_layer(modal_api: ModalRecorder, image_id: str, dockerfile: str, build_args: dict[str, str]):
    """The layer that holds `dockerfile` as the app renders it for Modal, after checking what
    comes before it: Python's image, and on builders up to 2024.10 the client's own install,
    which runs as root since no USER came yet."""
    base, commands = modal_dockerfile(dockerfile, build_args)
    layers = modal_api.lineage(image_id)
    at = next(i for i, layer in enumerate(layers) if layer.dockerfile_commands == ["FROM base", *commands])
    assert layers[0].registry_bases == [base]
    assert all(layer.user in ("", "root") for layer in layers[:at])
    return layers[at]


def assert_built_from(modal_api: ModalRecorder, image_id: str, dockerfile: str, build_args: dict[str, str]) -> None:
    """Built from `dockerfile` as compose builds it, the repository its context: a context that
    holds, unchanged, exactly the files the client selects for those commands."""
    built = rendered_layer(modal_api, image_id, dockerfile, build_args)
    _, commands = modal_dockerfile(dockerfile, build_args)
    assert set(built.context) == build_context(commands=commands, context_dir=REPO)
    assert_runs_as_the_app_needs(modal_api, image_id)


def assert_runs_as_the_app_needs(modal_api: ModalRecorder, image_id: str) -> None:
    """Every file uploaded as a build context is the repository's, unchanged; the image runs as
    root (the app's files are mounted under /root) with the configs and models where the app
    mounts them."""
    layers = modal_api.lineage(image_id)
    uploaded = {path: digest for layer in layers for path, digest in layer.context.items()}
    assert {path: digest for path, digest in uploaded.items() if sha256(REPO / path) != digest} == {}
    final = layers[-1]
    assert final.user in ("", "root")
    assert final.env["CHORUS_CONFIGS_DIR"] == "/chorus/configs"
    assert final.env["CHORUS_MODELS_DIR"] == "/models"


def mounted_files(modal_api: ModalRecorder, function) -> dict[str, str]:
    return modal_api.mount_files(list(function.definition.mount_ids))


def local_files(folder: str, remote: str) -> dict[str, str]:
    return {
        f"{remote}/{path.relative_to(REPO / folder).as_posix()}": sha256(path)
        for path in sorted((REPO / folder).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.mark.parametrize("builder_version", BUILDER_VERSIONS)
def test_the_router_deploys_built_as_compose_builds_it(monkeypatch, tmp_path, no_network, no_token, builder_version):
    # No model: the router alone.
    app = load_app(monkeypatch, write_configs(tmp_path / "configs", []))
    with modal_server(builder_version=builder_version, secrets_present=SECRETS) as modal_api:
        deploy(app)

    assert modal_api.build_errors() == {}
    web = modal_api.function("web")
    assert web.tag == "web"
    assert_built_from(modal_api, web.image_id, ROUTER_DOCKERFILE, {})
    final = modal_api.lineage(web.image_id)[-1]
    assert final.env["CHORUS_MODE"] == "modal" and final.env["CHORUS_MODAL_APP"] == app.APP_NAME
    # A WebSocket is one call of this function: the router ends it, with a message, before Modal would.
    assert float(final.env["CHORUS_WEBSOCKET_MAX_SECONDS"]) < modal_api.describe(web)["timeout"]

    assert modal_api.describe(web) == {
        "gpu": None, "cpu": None, "memory": None, "timeout": 900, "startup_timeout": 900,
        "min_containers": 0, "max_containers": None, "scaledown_window": 300,
        "max_concurrent_inputs": 100, "target_concurrent_inputs": None,
        "volumes": {"/models": "chorus-models"}, "secrets": ["chorus-api-key"],
        "enable_memory_snapshot": False, "is_class": False, "parameters": {}, "methods": [],
        "webhook": "WEBHOOK_TYPE_ASGI_APP",
    }
    # The app file, the router and Chorus's packages as Modal adds them at container start.
    files = mounted_files(modal_api, web)
    assert files["root/modal_app.py"] == sha256(REPO / "infra" / "modal_app.py")
    for folder in ("router", "functions"):
        expected = local_files(folder, f"root/{folder}")
        assert {path: files.get(path) for path in expected} == expected


@pytest.mark.parametrize("builder_version", BUILDER_VERSIONS)
def test_what_the_client_adds_comes_before_the_dockerfile(monkeypatch, tmp_path, no_network, no_token, builder_version):
    """modal 1.6.4 installs its own requirements on builders up to 2024.10; after a Dockerfile it
    would run as the Dockerfile's last USER. The app's images start from Python's image and put
    the Dockerfile's commands after whatever the client adds, so any builder version works."""
    app = load_app(monkeypatch, write_configs(tmp_path / "configs", []))
    with modal_server(builder_version=builder_version, secrets_present=SECRETS) as modal_api:
        deploy(app)

    image_id = modal_api.function("web").image_id
    base = modal_api.lineage(image_id)[0]
    rendered_layer(modal_api, image_id, ROUTER_DOCKERFILE, {})
    installs = any("pip install" in command for command in base.dockerfile_commands)
    assert installs == (builder_version <= "2024.10")
    assert modal_api.function("web").definition.mount_client_dependencies == (builder_version > "2024.10")


def test_each_backend_class_is_defined_as_the_router_calls_it_on_an_image_modal_builds(
    monkeypatch, tmp_path, no_network, no_token
):
    """Each backend's class as `modal deploy` defines it, and its worker image as Modal's builder
    takes it (one deploy of every backend for both: each costs most of a minute here)."""
    configs = write_configs(tmp_path / "configs", ALL_BACKENDS)
    app = load_app(monkeypatch, configs)
    with modal_server(secrets_present=SECRETS) as modal_api:
        deploy(app)

    published = modal_api.published[modal_api.deployed[app.APP_NAME]]
    assert set(published.class_ids) == set(BACKENDS.values())
    assert set(published.function_ids) == {"web", *(f"{name}.*" for name in BACKENDS.values())}
    configs_mounted = {f"chorus/configs/{path.name}": sha256(path) for path in configs.iterdir()}
    for backend, class_name in BACKENDS.items():
        service = modal_api.function(f"{class_name}.*")
        assert modal_api.describe(service) == {
            # GPU, CPU, memory, windows, concurrency and warm containers are each model's own,
            # sent with its calls (with_options, with_concurrency, update_autoscaler).
            "gpu": None, "cpu": None, "memory": None,
            # A call may take the client's default 300 s unless the model's own `timeout` says
            # otherwise (with_options); starting a container, the class's own bound: the
            # configs' default startup_timeout, sized for a large checkpoint's load.
            "timeout": 300, "startup_timeout": 900,
            "min_containers": 0, "max_containers": None, "scaledown_window": None,
            "max_concurrent_inputs": None, "target_concurrent_inputs": None,
            "volumes": {"/models": "chorus-models"}, "secrets": [],
            "enable_memory_snapshot": True, "is_class": True, "parameters": {"model": "PARAM_TYPE_STRING"},
            "methods": ["synthesize"], "webhook": None,
        }, backend
        # Its image: the worker's Dockerfile, from Python's image, made to run as the app needs.
        assert modal_api.lineage(service.image_id)[0].registry_bases == ["python:3.11-slim-bookworm"], backend
        assert_runs_as_the_app_needs(modal_api, service.image_id)
        files = mounted_files(modal_api, service)
        assert files["root/modal_app.py"] == sha256(REPO / "infra" / "modal_app.py"), backend
        assert {path: digest for path, digest in files.items() if path.startswith("chorus/configs/")} == configs_mounted
        expected = local_files("functions", "root/functions")
        assert {path: files.get(path) for path in expected} == expected, backend

    assert modal_api.build_errors() == {}
    for backend, class_name in BACKENDS.items():
        image_id = modal_api.function(f"{class_name}.*").image_id
        uploaded = {path: digest for layer in modal_api.lineage(image_id) for path, digest in layer.context.items()}
        # What images/worker/install.sh reads reaches the builder, with the worker's own files
        # (however the Dockerfile names them).
        folder = REPO / "images" / backend
        needed = [REPO / "images/worker/install.sh", *(folder / name for name in INSTALLED if (folder / name).exists())]
        if worker_build_args(backend)["TORCH"] == "true":
            needed.append(REPO / "images/worker/torch.txt")
        for path in needed:
            assert uploaded.get(path.relative_to(REPO).as_posix()) == sha256(path), (backend, path.name)
        assert_built_from(modal_api, image_id, WORKER_DOCKERFILE, worker_build_args(backend, gpu=gpu_wanted(backend)))


def test_a_class_may_start_for_as_long_as_its_slowest_model_asks(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [
        {"name": "quick", "backend": "piper", "parameters": {"model": "a.onnx"}, "deploy": {"startup_timeout": 60}},
        {"name": "slow", "backend": "piper", "parameters": {"model": "b.onnx"}, "deploy": {"startup_timeout": 1800}},
    ])
    app = load_app(monkeypatch, configs)
    with modal_server(secrets_present=SECRETS) as modal_api:
        deploy(app)
    assert modal_api.describe(modal_api.function("PiperBackend.*"))["startup_timeout"] == 1800


@pytest.mark.filterwarnings("error::modal.exception.DeprecationError")
def test_keep_models_warm_sets_each_models_own_containers(monkeypatch, tmp_path, no_network, no_token):
    """`python infra/modal_app.py` after a deploy: each model that asks for warm containers gets
    them on its own variant of its backend's class, with its GPU and windows."""
    configs = write_configs(tmp_path / "configs", [
        {"name": "warm", "backend": "piper", "parameters": {"model": "a.onnx"},
         "deploy": {"gpu": "A10G:2", "min_containers": 2, "max_containers": 3, "timeout": 120}},
        {"name": "cold", "backend": "piper", "parameters": {"model": "b.onnx"}},
    ])
    app = load_app(monkeypatch, configs)
    with modal_server(secrets_present=SECRETS) as modal_api:
        deploy(app)
        assert app.keep_models_warm() == {"warm": 2}

    service = modal_api.function("PiperBackend.*")
    (bound,) = modal_api.bound.values()
    assert bound.base_function_id == service.function_id
    options = bound.request.function_options
    assert bound.gpu == "A10G:2"
    assert (options.concurrency_limit, options.timeout_secs, options.task_idle_timeout_secs) == (3, 120, 300)
    assert options.max_concurrent_inputs == 4
    assert modal_api.autoscaler[bound.function_id].min_containers == 2


def test_a_class_looked_up_by_name_is_only_fetched_when_used(monkeypatch, tmp_path, no_network, no_token):
    import modal

    app = load_app(monkeypatch, write_configs(tmp_path / "configs", []))
    with modal_server(secrets_present=SECRETS) as modal_api:
        deploy(app)
        calls = len(modal_api.calls)
        missing = modal.Cls.from_name(app.APP_NAME, "NoSuchBackend")
        variant = missing.with_options(gpu="T4")(model="x")
        assert len(modal_api.calls) == calls
        with pytest.raises(modal.exception.NotFoundError, match="Lookup failed for Cls 'NoSuchBackend' from the 'chorus' app"):
            variant.update_autoscaler(min_containers=1)
        assert modal_api.calls[calls:] == ["ClassGet"]


# -- the server holds to Modal's rules --------------------------------------------------------


def probe_app(tmp_path: Path, image: str, function_options: str = "", files: dict[str, str] | None = None):
    """A one-function app in a module of its own, its image made by `image` (code, with `here`
    the module's folder), the build context holding `files`."""
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    module = tmp_path / "probe_app.py"
    module.write_text(textwrap.dedent(f"""
        from pathlib import Path
        import modal

        here = Path(__file__).parent
        app = modal.App("probe")
        image = {image}
        APP_NAME = "probe"

        @app.function(image=image{function_options})
        def probe():
            return 1
    """))
    return import_file(module, f"probe_app_{tmp_path.name}")


def dockerfile_image(tmp_path: Path, dockerfile: str, build_args: dict[str, str] | None = None) -> str:
    (tmp_path / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    return f'modal.Image.from_dockerfile(here / "Dockerfile", context_dir=here, build_args={build_args or {}!r})'


@pytest.mark.parametrize(
    ("dockerfile", "build_args", "error"),
    [
        ("FROM python:3.11-slim\nCOPY data/ /data/\n", {}, 'COPY failed: "/data" not found'),
        # The client uploads what the literal source matches: nothing for files/${NAME}.txt (one
        # that starts with `$` it refuses itself).
        ("FROM python:3.11-slim\nARG NAME\nCOPY files/${NAME}.txt /x\n", {"NAME": "present"},
         'COPY failed: "/files/present.txt" not found'),
        ("FROM python:3.11-slim\nADD present.txt /x\n", {}, 'ADD failed: "/present.txt" not found'),
        ("FROM python:3.11-slim\nVOLUME /data\n", {}, "VOLUME is not supported"),
        ("FROM python:3.11-slim\nSTOPSIGNAL SIGINT\n", {}, "STOPSIGNAL is not supported"),
    ],
)
def test_a_layer_fails_as_modals_builder_fails_it(tmp_path, no_network, no_token, dockerfile, build_args, error):
    import modal

    app = probe_app(tmp_path, dockerfile_image(tmp_path, dockerfile, build_args), files={"present.txt": "here", "files/present.txt": "here"})
    with modal_server() as modal_api, pytest.raises(modal.exception.ImageBuildError, match=error):
        deploy(app)
    assert modal_api.functions == {}


def test_a_layer_whose_copy_sources_were_uploaded_builds(tmp_path, no_network, no_token):
    dockerfile = "FROM python:3.11-slim\nARG NAME=x\nCOPY present.txt data/ /app/\nCOPY [\"d*/b.txt\", \"/b\"]\nUSER 1000\n"
    app = probe_app(tmp_path, dockerfile_image(tmp_path, dockerfile), files={
        "present.txt": "here", "data/a.txt": "a", "data/b.txt": "b", "other.txt": "not copied",
    })
    with modal_server() as modal_api:
        deploy(app)
    (layer,) = modal_api.lineage(modal_api.function("probe").image_id)[:1]
    assert set(layer.context) == {"present.txt", "data/a.txt", "data/b.txt"}
    assert layer.context["present.txt"] == hashlib.sha256(b"here").hexdigest()
    assert layer.user == "1000"


@pytest.mark.parametrize(("gpu", "accepted"), [("A10G:4", True), ("A10G:8", False), ("H100:8", True), ("X100", False)])
def test_a_gpu_must_be_one_modal_offers(tmp_path, no_network, no_token, gpu, accepted):
    import modal

    app = probe_app(tmp_path, "modal.Image.debian_slim()", f", gpu={gpu!r}")
    with modal_server() as modal_api:
        if accepted:
            deploy(app)
            assert modal_api.function("probe").gpu == gpu
        else:
            with pytest.raises(modal.exception.InvalidError, match="GPU"):
                deploy(app)


def test_a_secret_must_hold_its_required_keys(tmp_path, no_network, no_token):
    import modal

    app = probe_app(
        tmp_path, "modal.Image.debian_slim()",
        ', secrets=[modal.Secret.from_name("keys", required_keys=["A", "B"])]',
    )
    with modal_server(secrets_present={"keys": {"A": "1"}}), pytest.raises(modal.exception.NotFoundError, match="B"):
        deploy(app)


def test_only_the_servers_own_token_is_accepted(tmp_path, no_network, no_token):
    import modal

    app = probe_app(tmp_path, "modal.Image.debian_slim()")
    with modal_server():
        # The server puts the environment back as it found it when it stops.
        os.environ["MODAL_TOKEN_SECRET"] = "as-someone-else"
        with pytest.raises(modal.exception.AuthError, match="Invalid token"):
            deploy(app)


def test_make_deploy_warns_of_weights_the_volume_lacks(monkeypatch, tmp_path, no_network, no_token):
    """`make deploy`'s second step, `python infra/modal_app.py`, run as written against a Volume
    that holds some of what the configs name."""
    configs = write_configs(tmp_path / "configs", [
        {"name": "tts-1", "backend": "piper", "parameters": {"model": "en_US-joe-medium.onnx"}},
        {"name": "voice", "backend": "piper", "parameters": {"model": "voices/a.onnx"}},
        {"name": "absent", "backend": "piper", "parameters": {"model": "voices/b.onnx"}},
        {"name": "bark", "backend": "bark", "parameters": {"model": "suno/bark-small"}},
        {"name": "music", "backend": "transformers-musicgen", "parameters": {"model": "facebook/musicgen-small"}},
        {"name": "xtts", "backend": "coqui", "parameters": {"model": "tts_models/multilingual/multi-dataset/xtts_v2"}},
        {"name": "kokoro", "backend": "kokoro"},
    ])
    held = {"voices/a.onnx", "voices/a.onnx.json", "kokoro-v1.0.onnx",
            "huggingface/hub/models--suno--bark-small/snapshots/1/config.json",
            "huggingface/hub/models--coqui--XTTS-v2/snapshots/1/model.pth"}
    app = load_app(monkeypatch, configs)
    with modal_server(secrets_present=SECRETS, volume_files={"chorus-models": held}):
        deploy(app)
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK, encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "CHORUS_CONFIGS_DIR": str(configs)}
        result = subprocess.run([sys.executable, str(APP_FILE)], env=env, capture_output=True, text=True,
                                timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    warned = {line.split("'")[1]: line for line in result.stdout.splitlines() if line.startswith("warning:")}
    assert set(warned) == {"absent", "music", "kokoro"}, result.stdout
    assert "parameters.model: voices/b.onnx" in warned["absent"]
    assert "parameters.model: facebook/musicgen-small" in warned["music"]
    assert "tts.voices_file: voices-v1.0.bin" in warned["kokoro"] and "kokoro-v1.0.onnx" not in warned["kokoro"]
    assert "modal volume put chorus-models" in warned["absent"]
