"""How each backend's image is built: one Dockerfile for every worker, told apart by build
arguments that follow from the backend's folder. docker compose, `make images` and the Modal app
all build with these, and the tests check that compose names the same ones.

Modal's builder gets the same Dockerfile rendered (`modal_dockerfile`): its client uploads as the
build context only the files that literal COPY sources match, expanding no build argument, and
its builder implements no VOLUME."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER_DOCKERFILE = "images/worker/Dockerfile"
ROUTER_DOCKERFILE = "images/router/Dockerfile"


def image_folder(backend: str) -> Path:
    """images/<backend>/: its lock (requirements.txt) and, where needed, system-packages.txt."""
    return REPO / "images" / backend


def normalised_name(name: str) -> str:
    """A distribution's name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def pinned_packages(text: str) -> dict[str, str]:
    """`name==version` lines (a lock, or `pip freeze`) as {normalised name: version}."""
    packages = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            packages[normalised_name(name)] = version.strip()
    return packages


def locked_packages(lock: Path) -> dict[str, str]:
    return pinned_packages(lock.read_text())


def uses_torch(backend: str) -> bool:
    return "torch" in locked_packages(image_folder(backend) / "requirements.txt")


def has_gpu_variant(backend: str) -> bool:
    """Whether `backend` has a lock of its own for GPUs (GPU=true installs it)."""
    return (image_folder(backend) / "requirements-gpu.txt").is_file()


def worker_build_args(backend: str, gpu: bool = False) -> dict[str, str]:
    """The worker Dockerfile's build arguments for `backend`. TORCH puts the shared torch layer
    (images/worker/torch.txt) under the backends whose lock has torch; with `gpu`, GPU picks the
    backend's GPU variant where it has one."""
    args = {"BACKEND": backend, "TORCH": "true" if uses_torch(backend) else "false"}
    if gpu and has_gpu_variant(backend):
        args["GPU"] = "true"
    return args


def image_prefix() -> str:
    """What the images' names start with: `chorus/`, or CHORUS_IMAGE_PREFIX (a registry's, or a
    test run's of its own), as compose reads it too."""
    return os.environ.get("CHORUS_IMAGE_PREFIX") or "chorus/"


@dataclass(frozen=True)
class ImageBuild:
    """One image Chorus ships: `<prefix><name>`, from `dockerfile` with `build_args`."""

    name: str
    dockerfile: str
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{image_prefix()}{self.name}"


def image_builds(backends: list[str]) -> list[ImageBuild]:
    """The router's image and each backend's worker, as compose builds them, and each GPU
    variant (`<backend>:gpu`) the Modal app builds for a backend that has one."""
    builds = [ImageBuild("router", ROUTER_DOCKERFILE)]
    for backend in backends:
        builds.append(ImageBuild(backend, WORKER_DOCKERFILE, worker_build_args(backend)))
        if has_gpu_variant(backend):
            builds.append(ImageBuild(f"{backend}:gpu", WORKER_DOCKERFILE, worker_build_args(backend, gpu=True)))
    return builds


#: What a container engine reads when it runs an image rather than when it builds one. Modal runs
#: its own entry point, as root (the app's files are mounted under /root), keeps no volume of the
#: image's and checks no health, and its builder implements no VOLUME: it gets none of these.
RUN_TIME_INSTRUCTIONS = frozenset({"USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD", "ENTRYPOINT", "STOPSIGNAL"})
_ARGUMENT = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, the rest) of each instruction, continuation lines joined and comments dropped,
    as Docker reads them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, even between continuation lines
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        if pending:
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def modal_dockerfile(dockerfile: str, build_args: dict[str, str]) -> tuple[str, list[str]]:
    """`dockerfile` (relative to the repository) as Modal's builder is given it: its base image,
    and the instructions after FROM with every build argument resolved (each ARG gets its value,
    and COPY and ENV name it literally) and none of `RUN_TIME_INSTRUCTIONS`. The layers are the
    ones compose builds, so the two install the same."""
    base = ""
    values: dict[str, str] = {}
    commands: list[str] = []
    for keyword, rest in dockerfile_instructions((REPO / dockerfile).read_text()):
        if keyword == "FROM":
            base = rest
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = build_args.get(name, default)
            commands.append(f"ARG {name}={shlex.quote(values[name])}")
        elif keyword not in RUN_TIME_INSTRUCTIONS:
            if keyword in ("COPY", "ADD", "ENV", "WORKDIR"):
                rest = _ARGUMENT.sub(lambda match: values.get(match[1] or match[2], match[0]), rest)
            commands.append(f"{keyword} {rest}")
    return base, commands
