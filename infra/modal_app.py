"""Chorus on Modal: `modal deploy infra/modal_app.py` (or `make deploy`).

What it deploys:
- one Modal class per backend that a config in configs/ uses (Piper, Coqui, ...), built from the
  worker Dockerfile with that backend's build arguments, as docker compose builds it. Each class is
  parametrised by the model name, so one class serves every config of its backend and each model
  gets its own containers, started only when a request names it;
- the router as an ASGI web endpoint on CPU, calling those classes by name;
- a Volume `chorus-models` mounted at /models (weights, voices, reference audio; the paths in the
  configs are relative to it) and a Secret `chorus-api-key` holding CHORUS_API_KEYS.

GPU, warm containers, idle window, time-out and concurrency come from the `deploy:` block of the
configs, read when this file is imported; a backend with several configs takes the most demanding
of each (the largest GPU, the longest windows, the smallest concurrency).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import modal

REPO = Path(__file__).resolve().parent.parent
if modal.is_local():
    # `modal deploy infra/modal_app.py` needs only modal installed, not Chorus itself.
    sys.path.insert(0, str(REPO))

from functions import BACKENDS, modal_class_name
from functions.config import ConfigError, DeploySettings, ModelConfig, validate_configs
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, worker_build_args

APP_NAME = os.environ.get("CHORUS_MODAL_APP") or "chorus"
VOLUME_NAME = "chorus-models"
SECRET_NAME = "chorus-api-key"
MODELS_DIR = "/models"
#: Where the configs the app was deployed with are mounted in every container, so the containers
#: see exactly the classes and settings that were deployed.
CONTAINER_CONFIGS_DIR = "/chorus/configs"

#: Modal's GPU types (modal.com/docs/guide/gpu), weakest first: the order picks the one a backend
#: gets when its configs ask for different GPUs.
GPU_TYPES = ("T4", "L4", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H200", "B200")
MAX_GPU_COUNT = 8
_GPU_SPEC = re.compile(r"^(?P<type>[A-Za-z0-9-]+?)(?::(?P<count>\d+))?$")


def configs_dir() -> Path:
    if modal.is_local():
        return Path(os.environ.get("CHORUS_CONFIGS_DIR") or REPO / "configs")
    return Path(CONTAINER_CONFIGS_DIR)


def parse_gpu(spec: str | None, source: str) -> tuple[str, int] | None:
    """`"A10G"` -> ("A10G", 1), `"h100:2"` -> ("H100", 2), None -> None (CPU); anything else is
    a ConfigError naming `source` and the types Modal offers."""
    if spec is None:
        return None
    match = _GPU_SPEC.match(spec.strip())
    name = match["type"].upper() if match else ""
    count = int(match["count"] or 1) if match else 0
    if name not in GPU_TYPES or not 1 <= count <= MAX_GPU_COUNT:
        raise ConfigError(
            f"{source}: field 'deploy.gpu': unknown GPU '{spec}'; Modal offers "
            f"{', '.join(GPU_TYPES)}, optionally with a count from 1 to {MAX_GPU_COUNT} "
            f"(e.g. 'A10G' or 'H100:2'), or null for CPU"
        )
    return name, count


def gpu_string(gpu: tuple[str, int] | None) -> str | None:
    if gpu is None:
        return None
    name, count = gpu
    return name if count == 1 else f"{name}:{count}"


def load_deploy_configs(directory: Path) -> dict[str, ModelConfig]:
    """The configs by name, validated as the router validates them and each GPU checked against
    Modal's types, so a typo fails the deploy with the file's name, not a container start."""
    configs: dict[str, ModelConfig] = {}
    for path, result in validate_configs(directory, Path(MODELS_DIR)):
        if isinstance(result, ConfigError):
            raise result
        parse_gpu(result.deploy.gpu, path.name)
        configs[result.name] = result
    return configs


def backend_deploy(configs: list[ModelConfig]) -> DeploySettings:
    """One backend class serves all these configs: give it what the most demanding one asks."""
    gpus = [parse_gpu(c.deploy.gpu, c.name) for c in configs]
    requested = [gpu for gpu in gpus if gpu is not None]
    gpu = max(requested, key=lambda g: (GPU_TYPES.index(g[0]), g[1])) if requested else None
    return DeploySettings(
        gpu=gpu_string(gpu),
        min_containers=max(c.deploy.min_containers for c in configs),
        scaledown_window=max(c.deploy.scaledown_window for c in configs),
        timeout=max(c.deploy.timeout for c in configs),
        # The smallest: a limit safe for the heaviest model is safe for all of them.
        max_concurrent_inputs=min(c.deploy.max_concurrent_inputs for c in configs),
    )


CONFIGS = load_deploy_configs(configs_dir())
#: backend -> the settings its class is deployed with; only backends some config uses are
#: deployed, so a deploy builds no image nobody calls.
DEPLOY: dict[str, DeploySettings] = {
    backend: backend_deploy([c for c in CONFIGS.values() if c.backend == backend])
    for backend in BACKENDS
    if any(c.backend == backend for c in CONFIGS.values())
}

app = modal.App(APP_NAME)
models_volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
api_key_secret = modal.Secret.from_name(SECRET_NAME, required_keys=["CHORUS_API_KEYS"])


def _image(
    dockerfile: str,
    *packages: str,
    build_args: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    ignore: Any = None,
) -> modal.Image:
    """The image docker compose builds from `dockerfile` with `build_args`, plus the Chorus
    packages and the configs this app was deployed with, added at container start."""
    image = modal.Image.from_dockerfile(REPO / dockerfile, context_dir=REPO, build_args=build_args or {})
    image = image.env(
        {"CHORUS_CONFIGS_DIR": CONTAINER_CONFIGS_DIR, "CHORUS_MODELS_DIR": MODELS_DIR, **(env or {})}
    )
    sources = {"ignore": ignore} if ignore is not None else {}
    return image.add_local_python_source(*packages, **sources).add_local_dir(
        configs_dir(), CONTAINER_CONFIGS_DIR
    )


class BackendService:
    """The body every backend class shares: one model (the `model` parameter) per container."""

    #: Set on each generated class.
    BACKEND = ""

    model: str

    @modal.enter(snap=True)
    def import_backend(self) -> None:
        # Before the memory snapshot: importing torch & co. is most of a cold start and touches
        # no GPU (backends pick their device when constructed, after the snapshot).
        from functions import backend_class

        backend_class(self.BACKEND)

    @modal.enter(snap=False)
    def load(self) -> None:
        from functions import create_backend

        models_dir = Path(os.environ.get("CHORUS_MODELS_DIR") or MODELS_DIR)
        self.backend = create_backend(self._config(), models_dir)
        self.backend.load()

    def _config(self) -> ModelConfig:
        config = CONFIGS.get(self.model)
        if config is None:
            # LocalAI's way: a model that is no config is a file in the models directory.
            return ModelConfig(name=self.model, backend=self.BACKEND, parameters={"model": self.model})
        if config.backend != self.BACKEND:
            # A request may override a config's backend; this class's backend is the one asked.
            return config.model_copy(update={"backend": self.BACKEND})
        return config

    @modal.method()
    def describe(self) -> dict[str, Any]:
        """What the router needs before it streams: the PCM rate and the voice names."""
        return {"sample_rate": self.backend.sample_rate, "voices": self.backend.voices()}

    @modal.method()
    def synthesize(self, request: dict[str, Any]):
        """PCM chunks (s16le mono bytes at `describe()["sample_rate"]`) for one request, given as
        `SynthesisRequest` JSON."""
        from functions.protocol import SynthesisRequest

        yield from self.backend.synthesize(SynthesisRequest.model_validate(request))


def _backend_class(backend: str, settings: DeploySettings) -> Any:
    name = modal_class_name(backend)
    body = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"The {backend} backend, one model per container.",
        "BACKEND": backend,
        # Modal reads parameters from the class's own annotations, not inherited ones.
        "__annotations__": {"model": str},
        "model": modal.parameter(),
    }
    user_cls = type(name, (BackendService,), body)
    decorated = app.cls(
        image=_image(WORKER_DOCKERFILE, "functions", build_args=worker_build_args(backend)),
        gpu=settings.gpu,
        volumes={MODELS_DIR: models_volume},
        min_containers=settings.min_containers,
        scaledown_window=settings.scaledown_window,
        timeout=settings.timeout,
        enable_memory_snapshot=True,
    )(modal.concurrent(max_inputs=settings.max_concurrent_inputs)(user_cls))
    return decorated


# Modal needs each class at module level under its own name: PiperBackend, CoquiBackend, ...
# (the ones the configs use).
for _backend, _settings in DEPLOY.items():
    globals()[modal_class_name(_backend)] = _backend_class(_backend, _settings)


router_image = _image(
    ROUTER_DOCKERFILE,
    "router",
    "functions",
    env={"CHORUS_MODE": "modal", "CHORUS_MODAL_APP": APP_NAME},
    # The router serves its playground page from router/static: keep every file but caches.
    ignore=["**/__pycache__", "**/*.pyc"],
)


@app.function(
    image=router_image,
    secrets=[api_key_secret],
    # LocalAI-style requests may name a model file in the Volume rather than a config.
    volumes={MODELS_DIR: models_volume},
    scaledown_window=300,
    timeout=900,
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app()
def web():
    """The LocalAI, OpenAI and ElevenLabs APIs, calling the backend classes above by name."""
    from router.app import create_app
    from router.settings import Settings

    return create_app(Settings.from_env(mode="modal", modal_app=APP_NAME))
