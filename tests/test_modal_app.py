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

import modal.runner
import pytest

from functions import BACKENDS
from functions.config import ConfigError, load_configs
from tests.containers import built_image
from tests.modal_offline import ALL_BACKENDS, APP_FILE, NO_NETWORK, load_app, write_configs
from tests.modal_server import modal_server
from tests.processes import REPO

# `.local()` and the fake's containers stand in for Modal's here, with a temporary models
# directory in place of the Volume that Modal warns is not mounted.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")


def test_only_the_backends_the_configs_use_are_deployed(monkeypatch, tmp_path, no_network, no_token):
    configs = write_configs(tmp_path / "configs", [{"name": "tts-1", "backend": "piper"}])
    app = load_app(monkeypatch, configs)
    assert app.DEPLOYED_BACKENDS == ["piper"]
    assert hasattr(app, "PiperBackend") and not hasattr(app, "CoquiBackend")


def test_the_shipped_configs_deploy_every_backend_they_name(monkeypatch, no_network, no_token):
    app = load_app(monkeypatch, REPO / "configs")
    named = {config.backend for config in load_configs(REPO / "configs", REPO / "models")}
    assert set(app.DEPLOYED_BACKENDS) == named


@pytest.mark.parametrize(("gpu", "says"), [
    ("X100", "Modal offers T4, L4"), ("T4 x2", "Modal offers T4, L4"),
    # Modal's server would refuse these only at a container's first start.
    ("A10G:0", "1 to 4 A10G"), ("A10G:8", "1 to 4 A10G"), ("H100:9", "1 to 8 H100"),
])
def test_an_unknown_gpu_or_count_is_a_clear_error(monkeypatch, tmp_path, no_token, gpu, says):
    configs = write_configs(
        tmp_path / "configs", [{"name": "broken", "backend": "bark", "deploy": {"gpu": gpu}}]
    )
    with pytest.raises(ConfigError) as error:
        load_app(monkeypatch, configs)
    message = str(error.value)
    assert "broken.yaml" in message and "deploy.gpu" in message and gpu in message
    assert says in message, message


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


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The app with a model per backend, deployed through Modal's own client to the test server:
    what each image's containers get is what the client sent."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        home = tmp_path_factory.mktemp("home")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("MODAL_CONFIG_PATH", str(home / ".modal.toml"))
        app = load_app(monkeypatch, write_configs(tmp_path_factory.mktemp("configs"), ALL_BACKENDS))
        with modal_server(secrets_present={"chorus-api-key": {"CHORUS_API_KEYS": "key"}}) as modal_api:
            modal.runner.deploy_app(app.app, name=app.APP_NAME)
    return app, modal_api


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


def run_as_modal(deployed, name: str, code: str) -> str:
    """`code` run in the backend's image as Modal runs it: root, the variables its image ends with."""
    image = built_image(name)
    app, modal_api = deployed
    env = modal_api.lineage(modal_api.function(f"{BACKENDS[name]}.*").image_id)[-1].env
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
def test_every_cache_a_backend_reads_lies_in_the_volume(deployed, name):
    paths = json.loads(run_as_modal(deployed, name, CACHE_PROBE))
    models_dir = deployed[0].MODELS_DIR
    outside = {what: path for what, path in paths.items() if not path.startswith(models_dir + "/")}
    assert not outside, f"{name} reads caches outside the models Volume: {outside}"


@pytest.mark.images
@pytest.mark.parametrize("name", list(BACKENDS))
def test_no_backend_queries_cuda_at_import(deployed, name):
    assert run_as_modal(deployed, name, CUDA_PROBE) == "imported"
