"""The images, built and run by a real Docker engine, the way users run them.

- Every image installs exactly its lock, runs as its non-root user, and the torch backends share
  one torch layer.
- The default compose stack (the router and Piper containers) serves the three API families, the
  README's quick start and both SDKs on its published port; a worker killed mid-stream (as an
  out-of-memory kill would) aborts the response, the router says 503 until the restart policy
  brings it back, and `down -v` leaves nothing behind.
- Every heavy backend's container, on the CPU (infra/compose.cpu.yaml), serves a tiny model the
  test places in the models volume, through the router container.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from functions import BACKENDS
from functions.images import ImageBuild, locked_packages, pinned_packages, uses_torch
from tests.audio import MP3, SHORT_SECONDS, SHORT_TEXT, assert_speech, decode
from tests.containers import (
    COMPOSE_FILE,
    REPO,
    build_images,
    built_image,
    compose_binary,
    compose_environment,
    require_engine,
)
from tests.processes import free_port
from tests.readme_blocks import RUN_BLOCKS, block_id, run_quick_start_block
from tests.tiny_models.harness import build_tiny_model
from tests.tiny_models.volume import HEAVY, place_tiny_models

pytestmark = pytest.mark.images

ALL_IMAGES = sorted([*BACKENDS, "router"])
TORCH_BACKENDS = sorted(b for b in BACKENDS if uses_torch(b))
CPU_OVERRIDE = REPO / "infra" / "compose.cpu.yaml"
#: About four minutes of speech: the worker is still busy when it is killed.
LONG_TEXT = " ".join(f"Paragraph {n} goes on about the weather, the sea and the long road home." for n in range(50))


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def inspect(kind: str, name: str) -> dict:
    return json.loads(docker(kind, "inspect", name))[0]


# --- the images ------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_the_image_installs_exactly_its_lock(image: str) -> None:
    tag = built_image(image)
    frozen = docker("run", "--rm", tag, "pip", "freeze", "--all", "--exclude", "pip")
    assert pinned_packages(frozen) == locked_packages(REPO / "images" / image / "requirements.txt")


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_the_image_runs_as_its_non_root_user(image: str) -> None:
    tag = built_image(image)
    assert inspect("image", tag)["Config"]["User"] == "10001:10001"
    assert docker("run", "--rm", tag, "id", "-u").strip() == "10001"


def test_kokoros_gpu_variant_installs_its_own_lock_and_still_speaks_on_a_cpu(tmp_path: Path) -> None:
    """GPU=true (the build argument the Modal app passes when a Kokoro model asks for a GPU)
    swaps in onnxruntime-gpu; where no GPU is attached its CUDA session falls back to the CPU."""
    tag = built_image("kokoro:gpu")
    frozen = docker("run", "--rm", tag, "pip", "freeze", "--all", "--exclude", "pip")
    assert pinned_packages(frozen) == locked_packages(REPO / "images" / "kokoro" / "requirements-gpu.txt")
    build_tiny_model(Path(sys.executable), "kokoro_model", tmp_path / "models")
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    speak = (
        "import onnxruntime, pathlib\n"
        "from functions.config import ModelConfig\n"
        "from functions.kokoro import KokoroBackend\n"
        "from functions.protocol import SynthesisRequest\n"
        "backend = KokoroBackend(ModelConfig(name='k', backend='kokoro'), pathlib.Path('/models'))\n"
        "backend.load(); backend.to_device()\n"
        "pcm = b''.join(backend.synthesize(SynthesisRequest(model='k', text='Hello there.')))\n"
        "print(onnxruntime.get_available_providers(), len(pcm) // 2)\n"
    )
    output = docker("run", "--rm", "-v", f"{tmp_path / 'models'}:/models:ro", tag, "python", "-c", speak)
    providers, samples = output.strip().splitlines()[-1].rsplit(" ", 1)
    assert "CUDAExecutionProvider" in providers and int(samples) > 24000 // 2


def test_the_build_step_prints_a_line_per_image_and_names_the_one_that_fails(tmp_path: Path) -> None:
    require_engine()
    (tmp_path / "Dockerfile.good").write_text("FROM python:3.11-slim-bookworm\nRUN true\n")
    (tmp_path / "Dockerfile.bad").write_text(
        "FROM python:3.11-slim-bookworm\nRUN echo 'the reason it failed' && false\n")
    good, bad = ImageBuild("build-step-test", "Dockerfile.good"), ImageBuild("build-step-broken", "Dockerfile.bad")
    lines: list[str] = []
    try:
        problem = build_images(lines.append, [good, bad, good], context=tmp_path)
    finally:
        docker("image", "rm", "--force", good.tag)
    assert problem is not None and problem.startswith(f"building {bad.tag} failed (exit status")
    assert "the reason it failed" in problem.split("its log")[1]
    # One line for the image that was built, none for the one after the failure.
    assert [line.split(":")[0].strip() for line in lines[1:]] == [good.tag]
    assert re.fullmatch(r"  chorus/build-step-test: \d+\.\d min, \d+\.\d\d GB", lines[1])


def test_the_torch_backends_share_one_torch_layer() -> None:
    layers = {b: inspect("image", built_image(b))["RootFS"]["Layers"] for b in [*TORCH_BACKENDS, "piper"]}
    shared = set.intersection(*(set(layers[b]) for b in TORCH_BACKENDS))
    # More than the base layers Piper has too: the torch layer is stored once for all of them.
    assert len(shared) > len(shared & set(layers["piper"]))


# --- compose ---------------------------------------------------------------------------------


@dataclass
class Stack:
    project: str
    files: tuple[Path, ...]
    env: dict[str, str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = [compose_binary(), "-p", self.project, *(f"-f{f}" for f in self.files), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check:
            assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}\n{self.logs()}"
        return result

    def logs(self) -> str:
        return self.compose("logs", "--tail", "40", timeout=60, check=False).stdout

    def container(self, service: str) -> dict:
        (cid,) = self.compose("ps", "-aq", service).stdout.split()
        return inspect("container", cid)

    def left_behind(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: docker(*command, "--filter", label, "-q").split()
            for kind, command in (("containers", ("ps", "-a")), ("networks", ("network", "ls")),
                                  ("volumes", ("volume", "ls")))
        }


def stack_up(files: tuple[Path, ...], **env: str) -> Stack:
    stack = Stack(f"chorus-test-{uuid.uuid4().hex[:8]}", files, {**compose_environment(), **env}, free_port())
    # Host ports of its own: another stack may be up (another test worker).
    stack.env["CHORUS_PORT"] = str(stack.port)
    stack.env["CHORUS_WYOMING_PORT"] = str(free_port())
    return stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for image in ("router", "piper"):
        built_image(image)
    running = stack_up((COMPOSE_FILE,))
    try:
        started = time.monotonic()
        running.compose("up", "-d", "--wait", "--wait-timeout", "300")
        print(f"compose up --wait: healthy in {time.monotonic() - started:.1f} s")
        yield running
    finally:
        running.compose("down", "-v", check=False)


def test_the_three_api_families_through_the_router_container(stack: Stack) -> None:
    url = stack.url
    openai = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": SHORT_TEXT, "voice": "alloy"}, timeout=60)
    localai = httpx.post(f"{url}/tts", json={"model": "tts-1", "input": SHORT_TEXT}, timeout=60)
    elevenlabs = httpx.post(
        f"{url}/v1/text-to-speech/en_US-joe-medium", params={"output_format": "mp3_44100_128"},
        json={"text": SHORT_TEXT, "model_id": "tts-1"}, timeout=60,
    )
    for response, content_type, codecs, rate in (
        (openai, "audio/mpeg", MP3, 22050),
        (localai, "audio/wav", {"pcm_s16le"}, 22050),
        (elevenlabs, "audio/mpeg", MP3, 44100),
    ):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(content_type)
        audio = decode(response.content)
        assert audio.codec in codecs and audio.sample_rate == rate
        assert_speech(audio)
    voices = httpx.get(f"{url}/v1/audio/voices", timeout=30).json()["voices"]
    assert {"id": "en_US-joe-medium", "name": "en_US-joe-medium", "model": "tts-1", "confirmed": True} in voices
    # The samples came from the Piper container: the router image has no backend library.
    assert stack.compose("logs", "piper").stdout.count("POST /synthesize") >= 3


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block_id(b) for b in RUN_BLOCKS])
def test_the_readme_quick_start_works_against_the_stack(block, stack: Stack, tmp_path: Path) -> None:
    run_quick_start_block(block, stack.port, tmp_path, stack.logs())


def test_a_workers_400_is_the_clients_400(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/audio/speech",
                          json={"model": "tts-1", "input": SHORT_TEXT, "voice": "nobody"}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "voice" and "nobody" in error["message"]


def test_containers_are_healthy_and_their_processes_are_not_root(stack: Stack) -> None:
    for service in ("router", "piper"):
        container = stack.container(service)
        assert container["State"]["Health"]["Status"] == "healthy", service
        status = Path(f"/proc/{container['State']['Pid']}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert uid == "10001", service
    (network,) = stack.container("piper")["NetworkSettings"]["Networks"]
    assert inspect("network", network)["Internal"] is True


def wait_for(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_a_killed_worker_aborts_the_response_then_comes_back(stack: Stack) -> None:
    piper = stack.container("piper")
    restarts = piper["RestartCount"]
    received = 0
    with httpx.stream(
        "POST", f"{stack.url}/v1/audio/speech",
        json={"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": "pcm"}, timeout=60,
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        received += len(next(chunks))
        # The worker's process dies as an out-of-memory kill ends it: not `docker stop`, which
        # the restart policy would respect.
        os.kill(piper["State"]["Pid"], signal.SIGKILL)
        # A chunked body that ends without its last chunk: the client cannot take the truncated
        # audio for a whole file.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            for chunk in chunks:
                received += len(chunk)
    assert received < 60 * 22050 * 2

    # Docker restarts it at once: how long /readyz says 503 meanwhile is the machine's speed to
    # decide, so the restart is what is waited on.
    wait_for(lambda: stack.container("piper")["RestartCount"] > restarts, 120, "the restart policy did not restart Piper")
    wait_for(lambda: status(f"{stack.url}/readyz") == 200, 120, "Piper's restart did not make the router ready")
    again = httpx.post(f"{stack.url}/tts", json={"model": "tts-1", "input": SHORT_TEXT}, timeout=60)
    assert again.status_code == 200
    assert SHORT_SECONDS[0] <= decode(again.content).duration <= SHORT_SECONDS[1]


def test_down_leaves_no_container_network_or_volume(stack: Stack) -> None:
    assert all(stack.left_behind().values()), "the stack should be up before it is taken down"
    stack.compose("down", "-v")
    assert stack.left_behind() == {"containers": [], "networks": [], "volumes": []}


# --- every heavy backend on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def heavy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for image in ("router", *HEAVY):
        built_image(image)
    root = tmp_path_factory.mktemp("heavy-stack")
    seed, configs = root / "seed", root / "configs"
    configs.mkdir()
    place_tiny_models(seed)
    for number, (config, _) in enumerate(HEAVY.values()):
        (configs / f"{number}-{config['name']}.yaml").write_text(yaml.safe_dump(config))
    # The containers' user reads what the test wrote.
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    root.chmod(0o755)
    override = root / "test.yaml"
    # The health check's own Python must not load the hook (torch and all, past its time-out).
    health = ["CMD", "env", "-u", "PYTHONPATH", "python", "-c",
              "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=4)"]
    valle = {"environment": {"PYTHONPATH": "/models/test-hooks"}, "healthcheck": {"test": health}}
    override.write_text(yaml.safe_dump({"services": {"vall-e-x": valle}}))
    running = stack_up((COMPOSE_FILE, CPU_OVERRIDE, override), CHORUS_CONFIGS_DIR=str(configs), COMPOSE_PROFILES="gpu")
    try:
        # Into the models volume, as a user would copy weights there: through a worker's container.
        running.compose("run", "--rm", "--no-deps", "-v", f"{seed}:/seed:ro", "--entrypoint", "cp",
                        "piper", "-r", "/seed/.", "/models/")
        started = time.monotonic()
        running.compose("up", "-d", "--wait", "--wait-timeout", "600", timeout=900)
        print(f"the CPU stack of every backend was healthy in {time.monotonic() - started:.1f} s")
        yield running
    finally:
        running.compose("down", "-v", check=False)


# Seven containers start on two cores: minutes, not seconds.
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("backend", sorted(HEAVY))
def test_each_heavy_backend_speaks_through_the_router_container_on_cpu(heavy_stack: Stack, backend: str) -> None:
    config, (route, body) = HEAVY[backend]
    body = dict(body)
    params = {"output_format": body.pop("output_format")} if "output_format" in body else {}
    response = httpx.post(f"{heavy_stack.url}{route}", params=params, json={"model": config["name"], **body},
                          timeout=600)
    assert response.status_code == 200, response.text
    audio = decode(response.content)
    shortest = 320 / 24000 if backend == "vall-e-x" else 0.2
    assert audio.container == "wav" and audio.duration >= shortest
    assert np.abs(audio.samples).max() > 0, "silence"
    assert heavy_stack.compose("logs", backend).stdout.count("POST /synthesize") >= 1
