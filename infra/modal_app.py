"""Chorus on Modal: `make deploy` (`modal deploy infra/modal_app.py`, then `python
infra/modal_app.py` to keep the models that ask for it warm).

Deploying needs Chorus installed beside modal (`pip install -e '.[modal]'`): this file reads and
validates the configs with Chorus's own code when it is imported.

What it deploys:
- one Modal class per backend that a config in configs/ uses (Piper, Coqui, ...), built from the
  worker Dockerfile with that backend's build arguments, as docker compose builds it. Each class is
  parametrised by the model name, and the router calls it with that model's `deploy:` settings
  (`with_options`, `with_concurrency`), so each model has its own GPU, windows and containers,
  started only when a request names it;
- the router as an ASGI web endpoint on CPU, calling those classes by name;
- a Volume `chorus-models` mounted at /models (weights, voices, reference audio, every cache the
  backends read; the paths in the configs are relative to it), a Secret `chorus-api-key` holding
  CHORUS_API_KEYS, and a Dict `chorus-voices` where the router remembers the voices of models
  whose containers ran, so a voice listing starts no container.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

from functions import BACKENDS, modal_class_name
from functions.config import BUNDLED_PIPER_VOICE, ConfigError, ModelConfig, validate_configs
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, modal_dockerfile, worker_build_args

#: The repository on the machine that deploys; in a container this file is /root/modal_app.py.
REPO = Path(__file__).resolve().parent.parent
APP_NAME = os.environ.get("CHORUS_MODAL_APP") or "chorus"
VOLUME_NAME = "chorus-models"  # the router's MODELS_VOLUME (router/runners/modal.py)
SECRET_NAME = "chorus-api-key"
VOICES_DICT_NAME = "chorus-voices"
MODELS_DIR = "/models"
#: Where the configs the app was deployed with are mounted in every container, so the containers
#: see exactly the classes and settings that were deployed.
CONTAINER_CONFIGS_DIR = "/chorus/configs"
#: Seconds one call of the web function may run. A WebSocket is one call: the router closes each
#: socket, with ElevenLabs' error message, half a minute before Modal would cut it with none.
WEB_TIMEOUT = 900


def configs_dir() -> Path:
    # Inside a container the image's environment points at CONTAINER_CONFIGS_DIR.
    return Path(os.environ.get("CHORUS_CONFIGS_DIR") or REPO / "configs")


def load_deploy_configs(directory: Path) -> dict[str, ModelConfig]:
    """The configs by name, validated as the router validates them (GPU types included), so a
    typo fails the deploy with the file's name, not a container start."""
    configs: dict[str, ModelConfig] = {}
    for _, result in validate_configs(directory, Path(MODELS_DIR)):
        if isinstance(result, ConfigError):
            raise result
        configs[result.name] = result
    return configs


CONFIGS = load_deploy_configs(configs_dir())
#: Only backends some config uses are deployed, so a deploy builds no image nobody calls.
DEPLOYED_BACKENDS = [backend for backend in BACKENDS if any(c.backend == backend for c in CONFIGS.values())]

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
    """The image docker compose builds from `dockerfile` with `build_args`, in the form Modal's
    builder takes (`modal_dockerfile`: build arguments resolved, no run-time instructions, so it
    ends as root whatever layers Modal adds), plus the Chorus packages and the configs this app
    was deployed with, added at container start."""
    if modal.is_local():
        base, commands = modal_dockerfile(dockerfile, build_args or {})
    else:
        # In a container the image is built already, and images/ is not there to be read.
        base, commands = "scratch", []
    image = modal.Image.from_registry(base).dockerfile_commands(commands, context_dir=REPO).env(
        {"CHORUS_CONFIGS_DIR": CONTAINER_CONFIGS_DIR, "CHORUS_MODELS_DIR": MODELS_DIR, **(env or {})}
    )
    sources = {"ignore": ignore} if ignore is not None else {}
    return image.add_local_python_source(*packages, **sources).add_local_dir(
        configs_dir(), CONTAINER_CONFIGS_DIR
    )


class BackendService:
    """The body every backend class shares: one model (the `model` parameter) per container,
    looked up and served as the router's local mode and the worker serve it."""

    #: Set on each generated class.
    BACKEND = ""

    model: str

    @modal.enter(snap=True)
    def load(self) -> None:
        # Before the memory snapshot, where no GPU is attached: the libraries and the weights,
        # in host memory, are what each restored container starts from.
        from functions.catalog import ModelCatalog
        from functions.serving import BackendPool, ServingError

        models_dir = Path(os.environ.get("CHORUS_MODELS_DIR") or MODELS_DIR)
        # As the router looked it up: this class's backend is the one the request asked for.
        self.config = ModelCatalog(CONFIGS.values(), models_dir).get(self.model, self.BACKEND, configless=True)
        self.pool = BackendPool(models_dir, on_device=False)
        try:
            self.pool.load(self.config)
        except ServingError as exc:
            # Each request tries again and answers this (a missing file: 404), as a worker does.
            print(f"model '{self.model}' is not loaded: {exc}")

    @modal.enter(snap=False)
    def to_device(self) -> None:
        self.pool.to_device()

    @modal.method()
    async def synthesize(self, request: dict[str, Any]) -> dict[str, Any]:
        """One chunk of text (`SynthesisRequest` JSON) as PCM: `pcm` (s16le mono bytes at
        `sample_rate`), its `word_times` where they were asked for and measured, and the model's
        `voices`. Async, so that cancelling the call (its client left) stops this input alone,
        at the backend's next chunk. A failure is raised as the pool's `ServingError`, its code
        the one every host reports."""
        from contextlib import aclosing

        from functions.protocol import SynthesisRequest, WordTimes
        from functions.saved_voices import saved_voice_missing
        from functions.serving import ServingError

        asked = SynthesisRequest.model_validate(request)
        if saved_voice_missing(self.pool.models_dir, asked.voice):
            # Saved (and committed by the router) after this container mounted the Volume: only a
            # reload shows it, and a reload is costly, so only for a voice not found.
            try:
                await models_volume.reload.aio()
            except RuntimeError as exc:  # files held open on the Volume; its message names them
                print(f"the models Volume could not be reloaded: {exc}")
            if saved_voice_missing(self.pool.models_dir, asked.voice):
                raise ServingError("backend_unavailable", f"model '{self.model}': the saved voice is not on the "
                                   "models Volume in this container yet; retry shortly")
        loaded = await self.pool.get(self.config)
        pcm = bytearray()
        words: list[tuple[int, int, int, int]] = []
        async with aclosing(loaded.chunks(asked)) as chunks:
            async for piece in chunks:
                if isinstance(piece, WordTimes):
                    words.extend(piece.words)
                else:
                    pcm += piece
        return {"sample_rate": loaded.backend.sample_rate, "pcm": bytes(pcm), "word_times": words,
                "voices": loaded.backend.voices()}


def _backend_class(backend: str) -> Any:
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
    # A backend with a GPU variant (Kokoro's onnxruntime-gpu) gets it when one of its models asks
    # for a GPU; that variant also runs on the CPU, for the models that do not.
    configs = [c for c in CONFIGS.values() if c.backend == backend]
    gpu = any(c.deploy.gpu for c in configs)
    # Read from images/, which a container does not have (nor needs: its image is built).
    build_args = worker_build_args(backend, gpu=gpu) if modal.is_local() else {}
    # GPU, windows, time-out and concurrency are each model's own: the router asks for them
    # with `with_options` and `with_concurrency` (see router/runners/modal.py). A container's
    # start-up (the snap=True load) is bounded per class, `with_options` cannot change it: the
    # largest any of the backend's models asks for.
    return app.cls(
        image=_image(WORKER_DOCKERFILE, "functions", build_args=build_args),
        volumes={MODELS_DIR: models_volume},
        enable_memory_snapshot=True,
        startup_timeout=max(c.deploy.startup_timeout for c in configs),
    )(user_cls)


# Modal needs each class at module level under its own name: PiperBackend, CoquiBackend, ...
for _backend in DEPLOYED_BACKENDS:
    globals()[modal_class_name(_backend)] = _backend_class(_backend)


router_image = _image(
    ROUTER_DOCKERFILE,
    "router",
    "functions",
    env={"CHORUS_MODE": "modal", "CHORUS_MODAL_APP": APP_NAME, "CHORUS_WEBSOCKET_MAX_SECONDS": str(WEB_TIMEOUT - 30)},
    # The router serves its playground page from router/static: keep every file but caches.
    ignore=["**/__pycache__", "**/*.pyc"],
)


@app.function(
    image=router_image,
    secrets=[api_key_secret],
    # LocalAI-style requests may name a model file in the Volume rather than a config.
    volumes={MODELS_DIR: models_volume},
    scaledown_window=300,
    timeout=WEB_TIMEOUT,
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app()
def web():
    """The LocalAI, OpenAI and ElevenLabs APIs, calling the backend classes above by name."""
    from router.app import create_app
    from router.settings import Settings

    return create_app(Settings.from_env(mode="modal", modal_app=APP_NAME))


def keep_models_warm(lookup: Any = modal.Cls.from_name) -> dict[str, int]:
    """`deploy.min_containers` for each model that asks for warm containers: a class decorator
    would give every model of the backend the same number, and each deploy resets what was set
    here, so `make deploy` runs this right after `modal deploy`."""
    from router.runners.modal import model_instance

    warm = {name: c.deploy.min_containers for name, c in CONFIGS.items() if c.deploy.min_containers}
    for name, count in warm.items():
        config = CONFIGS[name]
        instance = model_instance(lookup(APP_NAME, modal_class_name(config.backend)), config)
        # `Function.autoscaler` is the client's current API; an instance's methods share its
        # function, the model's variant (modal 1.6.4: the instance's own update_autoscaler still
        # goes through the one it deprecates).
        instance.synthesize.autoscaler.update(min_containers=count)
    return warm


def _listing(volume: Any, path: str) -> list[Any] | None:
    """What the Volume holds at `path` (a file: itself); None where it holds nothing."""
    try:
        return volume.listdir(path)
    except (modal.exception.NotFoundError, FileNotFoundError):
        return None


def weights_missing(volume: Any = models_volume) -> dict[str, list[str]]:
    """What each config names that is not in the models Volume, by model: a file or folder of
    the Volume, or for a Hugging Face hub id (`org/name`) its folder in the hub cache the
    backends read (huggingface/hub/models--org--name); for a Coqui catalogue name, Coqui's own
    cache (tts/tts/...) or, for the models Coqui keeps on the hub (XTTS), any of coqui's there.
    The bundled Piper voice is put in by Piper itself."""
    missing: dict[str, list[str]] = {}
    for name, config in CONFIGS.items():
        for field, value in config.file_fields().items():
            if config.backend == "piper" and value == BUNDLED_PIPER_VOICE:
                continue
            places = [value]
            if value.startswith("tts_models/"):
                places.append("tts/tts/" + value.replace("/", "--"))
                hub = _listing(volume, "huggingface/hub") or []
                places += [entry.path for entry in hub if entry.path.startswith("huggingface/hub/models--coqui--")]
            elif value.count("/") == 1:
                places.append("huggingface/hub/models--" + value.replace("/", "--"))
            if all(_listing(volume, place) is None for place in places):
                missing.setdefault(name, []).append(f"{field}: {value}")
    return missing


if __name__ == "__main__":
    for model, count in keep_models_warm().items():
        print(f"model '{model}': {count} container(s) kept warm")
    for model, absent in weights_missing().items():
        print(f"warning: model '{model}' names what the Volume {VOLUME_NAME} does not hold "
              f"({'; '.join(absent)}): it answers 404 until that is put there "
              f"(`modal volume put {VOLUME_NAME} ...`; see the README's Deploy on Modal)")
