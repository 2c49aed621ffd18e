"""The Modal app (infra/modal_app.py) imported here, offline, for the tests that inspect it or
run its classes: a fresh import per set of configs, and the network blocked (the `no_network`
and `no_token` fixtures in conftest.py)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import yaml

from tests.processes import REPO

APP_FILE = REPO / "infra" / "modal_app.py"

_counter = itertools.count()

#: One model per backend, most of them on a GPU.
ALL_BACKENDS = [
    {"name": "voice-a", "backend": "piper", "parameters": {"model": "a.onnx"}},
    {"name": "xtts", "backend": "coqui", "parameters": {"model": "tts_models/x"}, "deploy": {"gpu": "T4"}},
    {"name": "bark", "backend": "bark", "parameters": {"model": "suno/bark"}, "deploy": {"gpu": "A100-80GB"}},
    {"name": "parler", "backend": "parler-tts", "parameters": {"model": "p/q"}, "deploy": {"gpu": "L4"}},
    {"name": "music", "backend": "transformers-musicgen", "parameters": {"model": "m/n"}, "deploy": {"gpu": "H100:2"}},
    {"name": "valle", "backend": "vall-e-x", "deploy": {"gpu": "L40S", "timeout": 1200}},
    {"name": "kokoro", "backend": "kokoro", "deploy": {"gpu": "T4"}},
]

# Loaded into each subprocess: refuses every connection that leaves the machine, and notes each
# refusal (a line naming the host) in the file NO_NETWORK_LOG names, if it is set: a test counts the
# attempts a command made rather than timing it.
NO_NETWORK = '''
import os
import socket
def _note(what):
    if os.environ.get("NO_NETWORK_LOG"):
        with open(os.environ["NO_NETWORK_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{what}\\n")
_connect = socket.socket.connect
def _connect_local(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
        return _connect(self, address)
    _note(host)
    raise ConnectionRefusedError(f"network blocked in tests: {address}")
socket.socket.connect = _connect_local
_getaddrinfo = socket.getaddrinfo
def _getaddrinfo_local(host, *args, **kwargs):
    if host in (None, "localhost", "127.0.0.1", "::1"):
        return _getaddrinfo(host, *args, **kwargs)
    _note(host)
    raise socket.gaierror(socket.EAI_NONAME, f"network blocked in tests: {host}")
socket.getaddrinfo = _getaddrinfo_local
'''


def load_app(monkeypatch, configs_dir: Path, models_dir: Path | None = None):
    """infra/modal_app.py imported afresh, reading `configs_dir`."""
    monkeypatch.setenv("CHORUS_CONFIGS_DIR", str(configs_dir))
    if models_dir is not None:
        monkeypatch.setenv("CHORUS_MODELS_DIR", str(models_dir))
    return import_file(APP_FILE, f"chorus_modal_app_{next(_counter)}")


def import_file(path: Path, name: str):
    """The Python file `path` imported afresh as module `name` (each import hydrates its Modal
    objects anew)."""
    spec = importlib.util.spec_from_file_location(name, path)
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


