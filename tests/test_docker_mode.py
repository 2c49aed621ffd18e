"""Docker mode against the real Docker engine: `CHORUS_MODE=docker chorus serve`, as a user starts
it on a workstation, starting and stopping the worker images `make images` builds.

Slot tests need two backends that use a GPU; only Piper's image is light enough to start in a
second here, so a second tag of it stands in for Coqui's (the slots count containers, not what
they say): its worker starts and is ready, and its requests answer that Coqui is not installed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from functions.images import image_prefix
from tests._live import assert_family_error
from tests.audio import decode
from tests.containers import built_image, require_engine
from tests.processes import chorus_command, chorus_server

pytestmark = pytest.mark.images

#: About a minute of speech: seconds of synthesis, a GPU slot held all along, while the second
#: request (sent once this one is in flight) arrives within milliseconds. (Three times as long cost
#: the two slot tests a minute and a half more on a loaded machine, and proved no more.)
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog, and the dog sleeps on."] * 20)
_numbers = itertools.count()


@pytest.fixture(scope="module")
def engine():
    require_engine()
    import docker

    built_image("piper")
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture
def project(engine):
    """This test's project: its containers' names and labels, and its network; all removed after."""
    name = f"chorus-test-{os.getpid()}-{next(_numbers)}"
    yield name
    for container in engine.containers.list(all=True, filters={"label": f"chorus.project={name}"}):
        container.remove(force=True)
    for network in engine.networks.list(names=[name]):
        network.remove()


def workers(engine, project: str, backend: str | None = None) -> list:
    labels = [f"chorus.project={project}", "chorus.managed=true"]
    if backend is not None:
        labels.append(f"chorus.backend={backend}")
    return engine.containers.list(filters={"label": labels})


def write_configs(directory: Path, **deploy_by_model: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, deploy in deploy_by_model.items():
        backend = deploy.pop("backend", "piper")
        parameters = {"model": "en_US-joe-medium.onnx"} if backend == "piper" else {"model": "tts_models/x"}
        config = {"name": name, "backend": backend, "parameters": parameters, "deploy": deploy}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return directory


@contextmanager
def docker_router(tmp_path: Path, project: str, configs: Path, **env: str):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    models.chmod(0o777)  # the workers run as their image's user
    settings = {
        "CHORUS_MODE": "docker", "CHORUS_DOCKER_PROJECT": project, "CHORUS_DOCKER_NETWORK": project,
        "CHORUS_DOCKER_IMAGE_PREFIX": image_prefix(),
        "CHORUS_DOCKER_CPU_ONLY": "1", "CHORUS_DOCKER_START_TIMEOUT": "60",
        "CHORUS_BACKEND_HEALTH_INTERVAL": "0.5", **env,
    }
    with chorus_server(models, tmp_path / "router.log", configs, env=settings) as server:
        yield server


def speak(server, text: str = "Hello there.", model: str = "tts-1", timeout: float = 90) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/speech", timeout=timeout,
                      json={"model": model, "input": text, "voice": "alloy", "response_format": "wav"})


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition` (a container's state, which no event announces) until it holds; `timeout`
    is a hang guard only."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout} s")


def test_the_first_request_starts_the_worker_and_an_idle_one_is_stopped(engine, project, tmp_path):
    configs = write_configs(tmp_path / "configs", **{"tts-1": {"scaledown_window": 2}})
    with docker_router(tmp_path, project, configs) as server:
        assert workers(engine, project) == [], "docker mode starts no worker before a request"
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        response = speak(server)
        assert response.status_code == 200, response.text
        assert 0.4 < decode(response.content).duration < 5
        [worker] = workers(engine, project, "piper")
        assert worker.labels["chorus.managed"] == "true"
        mounts = {m["Destination"]: m for m in worker.attrs["Mounts"]}
        assert mounts["/app/configs"]["RW"] is False and mounts["/models"]["RW"] is True
        assert project in worker.attrs["NetworkSettings"]["Networks"]
        # Warm: the same container serves the next request.
        assert speak(server).status_code == 200
        assert [w.id for w in workers(engine, project)] == [worker.id]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'chorus_cold_starts_total{backend="piper"} 1.0' in metrics
        assert 'chorus_workers_running{backend="piper"} 1.0' in metrics
        wait_for(lambda: not workers(engine, project), 60, "the idle worker was not stopped")
        # The gauge follows once the router has seen the container go.
        wait_for(lambda: 'chorus_workers_running{backend="piper"} 0.0' in httpx.get(f"{server.url}/metrics").text,
                 60, "the workers gauge did not come back to 0")
        # Scaled to zero, a request starts it again.
        assert speak(server).status_code == 200
        assert len(workers(engine, project)) == 1


def test_requests_during_a_cold_start_share_one_container(engine, project, tmp_path):
    configs = write_configs(tmp_path / "configs", **{"tts-1": {"scaledown_window": 60, "max_concurrent_inputs": 5}})
    with docker_router(tmp_path, project, configs) as server:
        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(lambda n: speak(server, f"Request number {n}."), range(5)))
        assert [r.status_code for r in responses] == [200] * 5
        assert all(decode(r.content).duration > 0.4 for r in responses)
        assert len(workers(engine, project, "piper")) == 1
        assert 'chorus_cold_starts_total{backend="piper"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_min_containers_starts_with_the_router_and_stays(engine, project, tmp_path, stand_in_images):
    # Beside it, a backend with the same window and no min_containers (Coqui's stand-in): once the
    # router has stopped that one for idling, it has looked at the kept one, idle longer still.
    prefix, _ = stand_in_images
    configs = write_configs(tmp_path / "configs", **{
        "tts-1": {"scaledown_window": 2, "min_containers": 1},
        "xtts": {"backend": "coqui", "scaledown_window": 2},
    })
    with docker_router(tmp_path, project, configs, CHORUS_DOCKER_IMAGE_PREFIX=prefix) as server:
        wait_for(lambda: workers(engine, project, "piper"), 60, "the kept worker did not start")
        [kept] = workers(engine, project, "piper")
        assert speak(server).status_code == 200
        # Used after Piper: its worker starts, and answers that the stand-in has no Coqui.
        assert_family_error(speak(server, model="xtts"), 503, code="backend_unavailable")
        assert running_backends(engine, project) == ["coqui", "piper"]
        wait_for(lambda: running_backends(engine, project) == ["piper"], 60, "the idle worker was not stopped")
        assert [w.id for w in workers(engine, project)] == [kept.id]


def test_a_killed_worker_is_replaced_by_the_next_request(engine, project, tmp_path):
    configs = write_configs(tmp_path / "configs", **{"tts-1": {"scaledown_window": 60}})
    with docker_router(tmp_path, project, configs) as server:
        assert speak(server).status_code == 200
        [first] = workers(engine, project)
        first.kill()
        response = speak(server)
        assert response.status_code == 200, response.text
        assert decode(response.content).duration > 0.4
        [second] = workers(engine, project)
        assert second.id != first.id


@pytest.fixture(scope="module")
def stand_in_images(engine):
    """Piper's image under a test prefix for piper and coqui, and one whose worker exits."""
    prefix = f"chorus-test-{os.getpid()}/"
    image = engine.images.get(built_image("piper"))
    for backend in ("piper", "coqui", "bark"):
        image.tag(f"{prefix}{backend}")
    broken = f"chorus-test-{os.getpid()}-broken/"
    dockerfile = f"FROM {built_image('piper')}\nCMD [\"python\", \"-c\", \"raise SystemExit('broken on purpose')\"]\n"
    subprocess.run(["docker", "build", "-q", "-t", f"{broken}piper", "-"], input=dockerfile, text=True,
                   check=True, capture_output=True)
    yield prefix, broken
    for tag in (f"{prefix}piper", f"{prefix}coqui", f"{prefix}bark", f"{broken}piper"):
        engine.images.remove(tag, noprune=True)


@pytest.fixture(scope="module")
def locked_out(engine):
    """Piper's image whose worker reads its configs from a folder only root may read, as a
    configs folder mounted from the host with mode 700 is to the worker's user."""
    prefix = f"chorus-test-{os.getpid()}-locked/"
    dockerfile = (f"FROM {built_image('piper')}\nUSER root\nRUN mkdir -m 700 /locked && cp -r /app/configs /locked/\n"
                  "USER 10001:10001\n"
                  'CMD ["python", "-m", "functions.worker", "--configs", "/locked/configs"]\n')
    subprocess.run(["docker", "build", "-q", "-t", f"{prefix}piper", "-"], input=dockerfile, text=True,
                   check=True, capture_output=True)
    yield prefix
    engine.images.remove(f"{prefix}piper", noprune=True)


def gpu_configs(tmp_path: Path) -> Path:
    return write_configs(tmp_path / "configs", **{
        "tts-1": {"gpu": "T4", "scaledown_window": 60},
        "xtts": {"backend": "coqui", "gpu": "T4", "scaledown_window": 60},
        "bark": {"backend": "bark", "gpu": "T4", "scaledown_window": 60},
    })


def running_backends(engine, project: str) -> list[str]:
    return sorted(w.labels["chorus.backend"] for w in workers(engine, project))


def test_a_gpu_slot_goes_to_the_new_backend_by_stopping_the_least_recently_used(
    engine, project, tmp_path, stand_in_images
):
    prefix, _ = stand_in_images
    with docker_router(tmp_path, project, gpu_configs(tmp_path), CHORUS_DOCKER_IMAGE_PREFIX=prefix,
                       CHORUS_DOCKER_GPU_SLOTS="2") as server:
        assert speak(server).status_code == 200
        [piper] = workers(engine, project, "piper")
        # CPU only: no device request, but the slot counts the same.
        assert not piper.attrs["HostConfig"].get("DeviceRequests")
        coqui = speak(server, model="xtts")
        assert_family_error(coqui, 503, code="backend_unavailable")
        assert "not installed" in coqui.json()["error"]["message"]
        assert running_backends(engine, project) == ["coqui", "piper"]
        assert speak(server).status_code == 200  # piper used last: coqui is the one to go
        speak(server, model="bark")
        assert running_backends(engine, project) == ["bark", "piper"]


@contextmanager
def coqui_while_piper_speaks_long(tmp_path, project, prefix: str, queue_timeout: float) -> Iterator[tuple]:
    """A router with one GPU slot, a long Piper request holding it, and a Coqui request made while
    it does: both answers, the router still running."""
    with docker_router(tmp_path, project, gpu_configs(tmp_path), CHORUS_DOCKER_IMAGE_PREFIX=prefix,
                       CHORUS_QUEUE_TIMEOUT=str(queue_timeout)) as server, ThreadPoolExecutor(1) as pool:
        assert speak(server).status_code == 200
        long = pool.submit(speak, server, LONG_TEXT)
        wait_for(lambda: "chorus_in_flight_requests{model=\"tts-1\"} 1.0" in
                 httpx.get(f"{server.url}/metrics").text, 60, "the long request did not start")
        waited = speak(server, model="xtts", timeout=queue_timeout + 90)
        yield long.result(), waited


def test_a_gpu_backend_waits_for_a_busy_slot_and_takes_it_once_free(engine, project, tmp_path, stand_in_images):
    prefix, _ = stand_in_images
    # A patience longer than the long request takes on a busy machine: this is about waiting.
    with coqui_while_piper_speaks_long(tmp_path, project, prefix, queue_timeout=300) as (long, waited):
        # The long request kept its slot to its end, and then gave it up.
        assert long.status_code == 200
        assert decode(long.content).duration > 3
        assert_family_error(waited, 503, code="backend_unavailable")  # the stand-in has no Coqui
        assert running_backends(engine, project) == ["coqui"]


def test_when_every_gpu_slot_is_busy_the_request_waits_then_gets_503(engine, project, tmp_path, stand_in_images):
    prefix, _ = stand_in_images
    with coqui_while_piper_speaks_long(tmp_path, project, prefix, queue_timeout=0.5) as (long, waited):
        assert long.status_code == 200
        assert_family_error(waited, 503, code="overloaded")
        assert int(waited.headers["retry-after"]) >= 1
        assert "GPU slot" in waited.json()["error"]["message"]
        assert [w.labels["chorus.backend"] for w in workers(engine, project)] == ["piper"]


def test_a_worker_that_never_becomes_ready_gives_503_and_its_log_stays_in_the_routers(
    engine, project, tmp_path, stand_in_images
):
    _, broken = stand_in_images
    configs = write_configs(tmp_path / "configs", **{"tts-1": {}})
    with docker_router(tmp_path, project, configs, CHORUS_DOCKER_IMAGE_PREFIX=broken) as server:
        response = speak(server)
        assert_family_error(response, 503, code="backend_unavailable")
        assert "backend 'piper'" in response.json()["error"]["message"]
        assert "broken on purpose" not in response.text
        assert "broken on purpose" in server.output()
        assert workers(engine, project) == []


def test_a_worker_that_cannot_read_its_configs_gives_503_at_once(engine, project, tmp_path, locked_out):
    """It will never load anything: it says 'failed', not 'loading', and the router answers at
    once (not after CHORUS_DOCKER_START_TIMEOUT, here a patience far longer than the test's
    client waits) with the problem in its log."""
    configs = write_configs(tmp_path / "configs", **{"tts-1": {}})
    with docker_router(tmp_path, project, configs, CHORUS_DOCKER_IMAGE_PREFIX=locked_out,
                       CHORUS_DOCKER_START_TIMEOUT="3600") as server:
        response = speak(server, timeout=120)
        assert_family_error(response, 503, code="backend_unavailable")
        assert "backend 'piper'" in response.json()["error"]["message"]
        assert "cannot load its models" in response.json()["error"]["message"]
        assert "Permission denied" in server.output() and "/locked/configs" in server.output()
        assert workers(engine, project) == []


def test_configs_the_workers_cannot_read_are_refused_at_start(tmp_path):
    """A configs folder only root may read (the router, as root, reads it; the workers' user
    cannot): `chorus serve` says what to change instead of starting workers that load nothing."""
    configs = write_configs(tmp_path / "configs", **{"tts-1": {}})
    configs.chmod(0o700)
    result = subprocess.run(
        chorus_command("serve", "--configs", str(configs), "--models", str(tmp_path)),
        env={**os.environ, "CHORUS_MODE": "docker", "PORT": "0"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "uid 10001" in result.stderr and str(configs) in result.stderr and "chmod o+r" in result.stderr


def test_a_missing_image_gives_503_naming_the_backend(engine, project, tmp_path):
    configs = write_configs(tmp_path / "configs", **{"tts-1": {}})
    with docker_router(tmp_path, project, configs, CHORUS_DOCKER_IMAGE_PREFIX="chorus-none/") as server:
        response = speak(server)
        assert_family_error(response, 503, code="backend_unavailable")
        message = response.json()["error"]["message"]
        assert "backend 'piper'" in message and "make images" in message


def test_without_an_engine_the_router_is_unready_and_answers_503(monkeypatch, tmp_path):
    from router.app import create_app
    from router.settings import Settings
    from tests.processes import serving

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    configs = write_configs(tmp_path / "configs", **{"tts-1": {}})
    settings = Settings(mode="docker", configs_dir=configs, models_dir=tmp_path)
    with serving(create_app(settings), ready_path="/healthz") as url:
        assert httpx.get(f"{url}/readyz").status_code == 503
        response = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "alloy"})
        assert_family_error(response, 503, code="backend_unavailable")
        assert "Docker engine cannot be reached" in response.json()["error"]["message"]


def test_the_router_in_its_container_starts_workers_with_its_own_mounts(engine, tmp_path):
    """infra/compose.docker.yaml as `make docker-up` runs it: the router in its image, holding
    the socket, gives its workers the configs and models volume it mounts itself."""
    from tests.containers import compose_binary, compose_environment
    from tests.processes import REPO, free_port

    built_image("router")
    configs = write_configs(tmp_path / "configs", **{"tts-1": {"scaledown_window": 60}})
    port = free_port()
    project = f"chorus-test-{os.getpid()}-compose"
    command = [compose_binary(), "-f", str(REPO / "infra" / "compose.docker.yaml"), "-p", project]
    env = {**compose_environment(), "CHORUS_PORT": str(port), "CHORUS_CONFIGS_DIR": str(configs)}
    up = subprocess.run([*command, "up", "-d", "--wait"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        response = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", timeout=120, json={
            "model": "tts-1", "input": "Hello from docker mode.", "voice": "alloy", "response_format": "wav"})
        assert response.status_code == 200, response.text
        assert decode(response.content).duration > 0.5
        [worker] = workers(engine, "chorus", "piper")
        mounts = {m["Destination"]: m for m in worker.attrs["Mounts"]}
        assert mounts["/app/configs"]["Source"] == str(configs) and mounts["/app/configs"]["RW"] is False
        assert mounts["/models"]["Name"] == f"{project}_models"
    finally:
        down = subprocess.run([*command, "down", "-v"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert workers(engine, "chorus") == [], "the router removes its workers as it stops"
