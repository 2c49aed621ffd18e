"""The Modal app (infra/modal_app.py), offline: what `modal deploy` would send, the app imported
the way a Modal container imports it, and each backend's image in the environment Modal gives it
(root, the Modal layers' variables): no CUDA query at import, every cache in the Volume.

The network is blocked throughout: nothing here may need a token or a connection. The router's
side (tests/test_modal_mode.py) runs these classes through a fake that holds to Modal's rules.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from functions import BACKENDS
from functions.config import ConfigError, load_configs
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, worker_build_args
from tests.containers import built_image
from tests.modal_offline import APP_FILE, NO_NETWORK, load_app, write_configs
from tests.processes import REPO

# `.local()` and the fake's containers stand in for Modal's here, with a temporary models
# directory in place of the Volume that Modal warns is not mounted.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")


def definition(cls) -> dict:
    """What `modal deploy` will send for a class's scaling settings, which FunctionInfo does not
    show offline: the values captured by the function's loader (modal is pinned at 1.6.4)."""
    from modal._utils.async_utils import synchronizer

    function = synchronizer._translate_in(cls._get_class_service_function())
    loader = function._load
    return dict(zip(loader.__code__.co_freevars, (c.cell_contents for c in loader.__closure__)))


ALL_BACKENDS = [
    {"name": "voice-a", "backend": "piper", "parameters": {"model": "a.onnx"}},
    {"name": "xtts", "backend": "coqui", "parameters": {"model": "tts_models/x"}, "deploy": {"gpu": "T4"}},
    {"name": "bark", "backend": "bark", "parameters": {"model": "suno/bark"}, "deploy": {"gpu": "A100-80GB"}},
    {"name": "parler", "backend": "parler-tts", "parameters": {"model": "p/q"}, "deploy": {"gpu": "L4"}},
    {"name": "music", "backend": "transformers-musicgen", "parameters": {"model": "m/n"}, "deploy": {"gpu": "H100:2"}},
    {"name": "valle", "backend": "vall-e-x", "deploy": {"gpu": "L40S", "timeout": 1200}},
    {"name": "kokoro", "backend": "kokoro", "deploy": {"gpu": "T4"}},
]
#: The backends some config of ALL_BACKENDS runs on a GPU: their GPU variant is built where they have one.
ON_GPU = {config["backend"] for config in ALL_BACKENDS if config.get("deploy", {}).get("gpu")}


def test_every_backend_gets_a_class_built_as_compose_builds_it(monkeypatch, tmp_path, no_network, no_token):
    import modal

    dockerfiles = set()
    from_dockerfile = modal.Image.from_dockerfile

    def recording(path, **options):
        dockerfiles.add((Path(path), Path(options["context_dir"]), tuple(sorted(options["build_args"].items()))))
        return from_dockerfile(path, **options)

    monkeypatch.setattr(modal.Image, "from_dockerfile", recording)
    app = load_app(monkeypatch, write_configs(tmp_path / "configs", ALL_BACKENDS))

    for backend, class_name in BACKENDS.items():
        cls = getattr(app, class_name)
        info = cls._get_class_service_function().info()
        # No GPU, windows or concurrency of the class's own: each model's come with its calls
        # (tests/test_modal_mode.py), so no model gets another's.
        assert info.gpus == [], backend
        assert set(info.method_names) == {"synthesize"}, backend
        assert info.volumes["/models"].name == "chorus-models", backend
        sent = definition(cls)
        assert sent["enable_memory_snapshot"] is True, backend
        assert not sent["min_containers"], backend

    web = app.web.info()
    assert web.gpus == []
    assert web.web_info is not None
    assert web.secrets == ["modal.Secret.from_name('chorus-api-key')"]
    # Every image is built as docker compose builds it: the worker Dockerfile with each backend's
    # build arguments, the router's own, the repository as the build context.
    assert dockerfiles == {
        *((REPO / WORKER_DOCKERFILE, REPO, tuple(sorted(worker_build_args(b, gpu=b in ON_GPU).items())))
          for b in BACKENDS),
        (REPO / ROUTER_DOCKERFILE, REPO, ()),
    }


def test_only_the_backends_the_configs_use_are_deployed(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [{"name": "tts-1", "backend": "piper"}])
    app = load_app(monkeypatch, configs)
    assert app.DEPLOYED_BACKENDS == ["piper"]
    assert hasattr(app, "PiperBackend") and not hasattr(app, "CoquiBackend")


def test_the_shipped_configs_deploy_every_backend_they_name(monkeypatch, no_network, no_token):
    app = load_app(monkeypatch, REPO / "configs")
    named = {config.backend for config in load_configs(REPO / "configs", REPO / "models")}
    assert set(app.DEPLOYED_BACKENDS) == named


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


def classes_and_parameters(module) -> dict[str, tuple]:
    import modal
    from modal._utils.async_utils import synchronizer

    found = {}
    for name, value in vars(module).items():
        if isinstance(value, modal.Cls):
            user_cls = synchronizer._translate_in(value)._user_cls
            found[name] = (tuple(sorted(user_cls.__annotations__)), value._get_class_service_function().info().method_names)
    return found


CONTAINER_IMPORT = '''
import importlib, json, sys
from modal._runtime import execution_context
# What a Modal container has set up before it imports the app: is_local() is now False.
execution_context._TaskLifecycleManager._singleton = object()
import modal
assert not modal.is_local()
sys.path.insert(0, sys.argv[1])
module = importlib.import_module("modal_app")
{function}
print(json.dumps({{"file": module.__file__, "classes": classes_and_parameters(module)}}))
'''


def test_a_container_imports_the_app_with_the_classes_that_were_deployed(monkeypatch, tmp_path, no_network, no_token):
    """As Modal's container does: the file at /root/modal_app.py beside the packages it adds, the
    configs at the container path, no repository around them, is_local() false."""
    deployed = classes_and_parameters(load_app(monkeypatch, REPO / "configs"))
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(APP_FILE, root / "modal_app.py")
    shutil.copytree(REPO / "functions", root / "functions")
    configs = shutil.copytree(REPO / "configs", tmp_path / "chorus" / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "CHORUS_")) and k != "PYTHONPATH"}
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK, encoding="utf-8")
    # The Modal image's environment, with the configs where this test put them.
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(tmp_path / "site"),
               CHORUS_CONFIGS_DIR=str(configs), CHORUS_MODELS_DIR=str(tmp_path / "models"))
    code = CONTAINER_IMPORT.format(function=inspect.getsource(classes_and_parameters))
    result = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["file"] == str(root / "modal_app.py")
    assert {name: (tuple(p), m) for name, (p, m) in seen["classes"].items()} == deployed
    assert set(deployed) == {"PiperBackend", "CoquiBackend", "BarkBackend", "ParlerBackend",
                             "MusicgenBackend", "ValleBackend", "KokoroBackend"}


# -- the images as Modal builds and runs them ------------------------------------------------


def _closure(function) -> dict:
    return dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))


def modal_dockerfile(image) -> tuple[list[str], dict[str, str]]:
    """The Dockerfile Modal's builder gets for `image` (the Dockerfile it starts from, then each
    layer the app adds), and that Dockerfile's build arguments."""
    from modal._utils.async_utils import synchronizer

    lines: list[str] = []
    layer = synchronizer._translate_in(image)
    while layer is not None:
        cells = _closure(layer._load)
        if "path" in cells:  # Image.from_dockerfile: the file is read when the image is built
            build_args = _closure(cells["dockerfile_image"]).get("build_args") or {}
            return Path(cells["path"]).read_text().split("\n") + lines, build_args
        if "dockerfile_function" in cells:
            commands = cells["dockerfile_function"]("2025.06").commands
            lines = [c for c in commands if c != "FROM base"] + lines
        bases = cells.get("base_images") or {}
        base = next(iter(bases.values()), None) or cells.get("base_image")
        layer = synchronizer._translate_in(base) if base is not None else None
    raise AssertionError("the image does not start from a Dockerfile")


def modal_environment(image, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The variables and the user a container of `image` runs with on Modal."""
    lines, build_args = modal_dockerfile(image)
    parser = DockerfileParser(path=str(tmp_path / "Dockerfile"), build_args=build_args)
    parser.content = "\n".join(lines)
    users = [item["value"] for item in parser.structure if item["instruction"] == "USER"]
    return dict(parser.envs), users[-1] if users else "root"


@pytest.fixture(scope="module")
def deployed_app(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return load_app(monkeypatch, write_configs(tmp_path_factory.mktemp("configs"), ALL_BACKENDS))


@pytest.mark.images
@pytest.mark.parametrize("name", ["router", *BACKENDS])
def test_a_modal_container_runs_as_root_with_the_apps_settings(deployed_app, tmp_path, name):
    """Modal mounts the app file and the packages under /root: the image's USER (non-root, for
    compose) must not be what runs there, whether or not Modal applies it."""
    image = deployed_app.router_image if name == "router" else definition(getattr(deployed_app, BACKENDS[name]))["image"]
    env, user = modal_environment(image, tmp_path)
    assert user.split(":")[0] in ("root", "0")
    assert env["CHORUS_CONFIGS_DIR"] == deployed_app.CONTAINER_CONFIGS_DIR
    assert env["CHORUS_MODELS_DIR"] == deployed_app.MODELS_DIR


#: Where each library a backend uses keeps what it reads, printed by code run in the image.
CACHE_PROBE = '''
import json, os, sys
backend = sys.argv[1]
paths = {"xdg cache": os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")}
if backend not in ("piper", "kokoro"):  # the ONNX backends read no hub or torch cache
    import huggingface_hub.constants as hf
    import torch.hub
    paths.update({"hugging face hub": hf.HF_HUB_CACHE, "hugging face": hf.HF_HOME,
                  "torch hub": torch.hub.get_dir()})
if backend == "coqui":
    from TTS.utils.manage import ModelManager
    paths["coqui models"] = str(ModelManager(progress_bar=False).output_prefix)
if backend == "vall-e-x":
    import functions.vall_e_x as vall_e_x
    paths["cloning prompts"] = str(vall_e_x._cache_dir())
    paths["whisper"] = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
print(json.dumps(paths))
'''

#: Importing a backend with every CUDA query made to fail: on Modal it is imported before the
#: memory snapshot, where no GPU is attached.
CUDA_PROBE = '''
import sys
try:
    import torch
except ImportError:  # Piper's image has none: nothing there can ask CUDA
    torch = None

def refuse(*args, **kwargs):
    raise AssertionError("CUDA was queried at import")

if torch is not None:
    for name in ("is_available", "device_count", "init", "_lazy_init", "get_device_capability",
                 "get_device_name", "current_device", "mem_get_info"):
        setattr(torch.cuda, name, refuse)
    torch._C._cuda_getDeviceCount = refuse
import functions
functions.backend_class(sys.argv[1])
print("imported")
'''


def run_as_modal(deployed_app, name: str, tmp_path: Path, code: str) -> str:
    """`code` run in the backend's image as Modal runs it: root, the Modal image's variables."""
    image = built_image(name)
    env, _ = modal_environment(definition(getattr(deployed_app, BACKENDS[name]))["image"], tmp_path)
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", "0:0", "-e", "HOME=/root", *env_args,
         "-w", "/app", image, "python", "-c", code, name],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.images
@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_cache_a_backend_reads_lies_in_the_volume(deployed_app, tmp_path, name):
    paths = json.loads(run_as_modal(deployed_app, name, tmp_path, CACHE_PROBE))
    outside = {what: path for what, path in paths.items() if not path.startswith(deployed_app.MODELS_DIR + "/")}
    assert not outside, f"{name} reads caches outside the models Volume: {outside}"


@pytest.mark.images
@pytest.mark.parametrize("name", list(BACKENDS))
def test_no_backend_queries_cuda_at_import(deployed_app, tmp_path, name):
    assert run_as_modal(deployed_app, name, tmp_path, CUDA_PROBE) == "imported"
