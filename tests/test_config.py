"""Model configs (LocalAI's schema plus `deploy:` and `voices:`), the registry's request
overrides, and `resolve_in`, which keeps every path inside the models directory."""

from __future__ import annotations

import os

import pytest

from functions.config import (
    ConfigError,
    ModelConfig,
    UnsafePathError,
    load_config_file,
    load_configs,
    resolve_in,
)
from router.errors import InvalidRequest, ModelNotFound
from router.registry import ModelRegistry
from router.runners.local import InProcessRunner
from router.settings import Settings
from router.speech import Ask, SpeechService
from tests.processes import CONFIGS

# A LocalAI config as its users write them: fields Chorus has no use for must not stop it.
LOCALAI_YAML = """\
name: xtts
backend: coqui
f16: true
threads: 4
context_size: 512
parameters:
  model: tts_models/multilingual/multi-dataset/xtts_v2
  language: fr
  temperature: 0.2
tts:
  voice: Ana Florence
  vall-e:
    audio_path: samples/ana.wav
deploy:
  gpu: T4
  min_containers: 1
  scaledown_window: 120
  max_concurrent_inputs: 2
voices:
  alloy: Claribel Dervla
"""


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


# --- Loading ---------------------------------------------------------------------------------


def test_localai_fields_load_and_extra_fields_are_ignored(tmp_path):
    config = load_config_file(write(tmp_path, "xtts.yaml", LOCALAI_YAML))
    assert (config.name, config.backend) == ("xtts", "coqui")
    assert config.parameters.model == "tts_models/multilingual/multi-dataset/xtts_v2"
    assert config.parameters.language == "fr"
    assert config.tts.voice == "Ana Florence"
    assert config.tts.vall_e.audio_path == "samples/ana.wav"
    assert (config.deploy.gpu, config.deploy.min_containers, config.deploy.scaledown_window) == ("T4", 1, 120)
    assert config.deploy.max_concurrent_inputs == 2
    assert config.voices == {"alloy": "Claribel Dervla"}


def test_defaults(tmp_path):
    config = load_config_file(write(tmp_path, "m.yaml", "name: m\nbackend: piper\n"))
    assert config.deploy.gpu is None and config.deploy.min_containers == 0
    assert config.tts.voice is None and config.voices == {}


def test_the_repo_configs_load_with_the_bundled_voice_first():
    configs = load_configs(CONFIGS, CONFIGS.parent / "models")
    first = configs[0]
    assert (first.name, first.backend, first.parameters.model) == ("tts-1", "piper", "en_US-joe-medium.onnx")


@pytest.mark.parametrize(
    "yaml, field",
    [
        ("name: m\nbackend: espeak\n", "backend"),
        ("backend: piper\n", "name"),
        ("name: ../evil\nbackend: piper\n", "name"),
        ("name: m\nbackend: piper\nparameters: [1]\n", "parameters"),
        ("name: m\nbackend: piper\ndeploy:\n  gpus: T4\n", "deploy.gpus"),
        ("name: m\nbackend: piper\ndeploy:\n  min_containers: -1\n", "deploy.min_containers"),
        ("name: m\nbackend: piper\ndeploy:\n  scaledown_window: 1\n", "deploy.scaledown_window"),
        ("name: m\nbackend: piper\ndeploy:\n  max_concurrent_inputs: 0\n", "deploy.max_concurrent_inputs"),
        ("name: m\nbackend: piper\ndeploy:\n  timeout: many\n", "deploy.timeout"),
        ("name: m\nbackend: piper\nvoices:\n  alloy: ''\n", "voices"),
    ],
)
def test_a_broken_config_names_file_and_field(tmp_path, yaml, field):
    with pytest.raises(ConfigError) as caught:
        load_config_file(write(tmp_path, "broken.yaml", yaml))
    message = str(caught.value)
    assert message.startswith("broken.yaml:")
    assert f"field '{field}'" in message


@pytest.mark.parametrize("text", ["name: [unclosed\n", "- a list\n- not a mapping\n", ""])
def test_unreadable_yaml_names_the_file(tmp_path, text):
    with pytest.raises(ConfigError, match=r"^bad\.yaml:"):
        load_config_file(write(tmp_path, "bad.yaml", text))


def test_duplicate_names_name_both_files(tmp_path):
    write(tmp_path, "a.yaml", "name: same\nbackend: piper\n")
    write(tmp_path, "b.yml", "name: same\nbackend: coqui\n")
    with pytest.raises(ConfigError) as caught:
        load_configs(tmp_path, tmp_path)
    assert "b.yml" in str(caught.value) and "a.yaml" in str(caught.value) and "field 'name'" in str(caught.value)


def test_configs_load_in_file_name_order_and_other_files_are_skipped(tmp_path):
    write(tmp_path, "b.yaml", "name: second\nbackend: piper\n")
    write(tmp_path, "a.yml", "name: first\nbackend: piper\n")
    write(tmp_path, "notes.txt", "not a config")
    (tmp_path / "dir.yaml").mkdir()
    assert [c.name for c in load_configs(tmp_path, tmp_path)] == ["first", "second"]


def test_a_path_outside_the_models_dir_names_file_and_field(tmp_path):
    write(tmp_path, "evil.yaml", "name: evil-model\nbackend: piper\nparameters:\n  model: ../x.onnx\n")
    with pytest.raises(ConfigError) as caught:
        load_configs(tmp_path, tmp_path / "models")
    assert str(caught.value).startswith("evil.yaml:") and "field 'parameters.model'" in str(caught.value)


def test_missing_configs_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelRegistry.from_dir(tmp_path / "nope", tmp_path)


@pytest.mark.parametrize(
    "update, field",
    [
        ({"parameters": {"model": "../x.onnx"}}, "parameters.model"),
        ({"parameters": {"model": "/etc/passwd"}}, "parameters.model"),
        ({"tts": {"vall-e": {"audio_path": "a/../../b.wav"}}}, "tts.vall-e.audio_path"),
    ],
)
def test_registry_refuses_config_paths_outside_models(tmp_path, update, field):
    config = ModelConfig.model_validate({"name": "m", "backend": "piper", **update})
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        ModelRegistry([config], tmp_path)


def test_registry_refuses_a_config_whose_file_is_a_symlink_out(tmp_path):
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "voice.onnx").write_bytes(b"x")
    (models / "voice.onnx").symlink_to(outside / "voice.onnx")
    config = ModelConfig(name="m", backend="piper", parameters={"model": "voice.onnx"})
    with pytest.raises(ConfigError, match="parameters.model"):
        ModelRegistry([config], models)


# --- Selection and overrides -----------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    configs = [
        ModelConfig.model_validate(
            {
                "name": "multi",
                "backend": "coqui",
                "parameters": {"model": "multi", "language": "fr"},
                "tts": {"voice": "Ana"},
                "voices": {"alloy": "Claribel", "rachel": "Dora"},
            }
        ),
        ModelConfig(name="plain", backend="piper", parameters={"model": "plain.onnx"}),
    ]
    (tmp_path / "plain.onnx").write_bytes(b"")
    registry = ModelRegistry(configs, tmp_path)
    # prepare() never touches the runner; a real one keeps the types honest.
    return SpeechService(registry, InProcessRunner(tmp_path), Settings(max_input_chars=100))


def prepare(service, **fields):
    return service.prepare(Ask(text="Hello.", text_param="input", **fields))


def test_first_config_is_the_default(service):
    assert prepare(service, model=None).config.name == "multi"
    assert prepare(service, model="").config.name == "multi"


def test_voice_overrides_tts_voice(service):
    assert prepare(service, model="multi").request.voice == "Ana"
    assert prepare(service, model="multi", voice="Baldur").request.voice == "Baldur"


def test_config_voices_mapping(service):
    assert prepare(service, model="multi", voice="alloy").request.voice == "Claribel"
    assert prepare(service, model="multi", voice="rachel").request.voice == "Dora"


def test_unmapped_openai_names_fall_back_to_the_default_voice(service):
    assert prepare(service, model="multi", voice="nova").request.voice == "Ana"
    assert prepare(service, model="plain", voice="alloy").request.voice is None


def test_language_overrides_parameters_language(service):
    assert prepare(service, model="multi").request.language == "fr"
    assert prepare(service, model="multi", language="de").request.language == "de"
    assert prepare(service, model="plain").request.language is None


def test_backend_overrides_backend(service):
    job = prepare(service, model="multi", backend="bark")
    assert job.config.backend == "bark" and job.config.name == "multi"
    # The stored config is not changed by one request's override.
    assert prepare(service, model="multi").config.backend == "coqui"


def test_request_fields_reach_the_synthesis_request(service):
    request = prepare(service, model="plain", speed=1.5, instructions="softly", seed=3).request
    assert (request.model, request.text, request.speed, request.instructions, request.seed) == (
        "plain", "Hello.", 1.5, "softly", 3
    )


def test_model_file_with_a_backend_localai_style(service):
    job = prepare(service, model="plain.onnx", backend="piper")
    assert job.config.parameters.model == "plain.onnx" and job.config.backend == "piper"
    assert job.config.configless and job.config.name == "plain.onnx"
    # Whether the file is there is the backend's to say (in http mode it is in the worker's
    # models volume, not the router's): its load answers 404 (tests/test_configless.py).
    assert prepare(service, model="absent.onnx", backend="piper").config.configless
    with pytest.raises(InvalidRequest) as caught:
        prepare(service, model="../plain.onnx", backend="piper")
    assert caught.value.param == "model"


def test_unknown_model_and_backend(service):
    with pytest.raises(ModelNotFound) as caught:
        prepare(service, model="nope")
    assert caught.value.param == "model" and "multi, plain" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        prepare(service, model="multi", backend="espeak")
    assert caught.value.param == "backend"


@pytest.mark.parametrize("text", ["", "   ", "x" * 101])
def test_text_is_checked_and_the_field_named(service, text):
    with pytest.raises(InvalidRequest) as caught:
        service.prepare(Ask(text=text, text_param="input", model=None))
    assert caught.value.param == "input"


def test_text_at_the_limit_is_accepted(service):
    assert service.prepare(Ask(text="x" * 100, text_param="input", model=None)).request.text == "x" * 100


# --- resolve_in ------------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    (root / "voices").mkdir(parents=True)
    (root / "voices" / "a.onnx").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("secret")
    return root


def test_resolve_inside(models):
    assert resolve_in(models, "voices/a.onnx") == (models / "voices" / "a.onnx").resolve()
    assert resolve_in(models, "./voices/a.onnx") == (models / "voices" / "a.onnx").resolve()
    # A name that does not exist yet still resolves (callers check existence themselves).
    assert resolve_in(models, "new.wav") == (models / "new.wav").resolve()


@pytest.mark.parametrize(
    "path",
    [
        "../secret.txt",
        "voices/../../secret.txt",
        "voices/../a.onnx",  # stays inside, but `..` is refused outright rather than reasoned about
        "/etc/passwd",
        "..\\secret.txt",
        "voices\\a.onnx",
        "",
        "a\x00b",
    ],
)
def test_resolve_refuses(models, path):
    with pytest.raises(UnsafePathError):
        resolve_in(models, path)


def test_encoded_traversal_is_only_a_name(models):
    # Nothing decodes percent escapes: "%2e%2e" is a literal directory name inside the models dir.
    resolved = resolve_in(models, "%2e%2e/%2e%2e/secret.txt")
    assert models.resolve() in resolved.parents
    assert not resolved.exists()


def test_symlink_escapes_are_refused(models, tmp_path):
    (models / "file-link").symlink_to(tmp_path / "secret.txt")
    (models / "dir-link").symlink_to(tmp_path)
    for path in ("file-link", "dir-link/secret.txt", "dir-link"):
        with pytest.raises(UnsafePathError):
            resolve_in(models, path)


def test_symlinks_inside_are_allowed(models):
    (models / "alias.onnx").symlink_to(models / "voices" / "a.onnx")
    assert resolve_in(models, "alias.onnx") == (models / "voices" / "a.onnx").resolve()


def test_models_dir_given_relative_or_through_a_symlink(models, tmp_path, monkeypatch):
    link = tmp_path / "models-link"
    link.symlink_to(models)
    assert resolve_in(link, "voices/a.onnx") == (models / "voices" / "a.onnx").resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_in(type(models)(os.path.relpath(models)), "voices/a.onnx").is_file()


def test_an_alias_selects_its_config_and_may_not_be_claimed_twice(tmp_path):
    """OpenAI clients with a fixed model name (LiveKit's gpt-4o-mini-tts) reach the config that
    lists it; two configs claiming one name is a config error naming both files."""
    from functions.catalog import ModelCatalog
    from functions.config import ConfigError, load_configs

    (tmp_path / "a.yaml").write_text("name: tts-1\naliases: [gpt-4o-mini-tts]\nbackend: piper\n")
    catalog = ModelCatalog(load_configs(tmp_path, tmp_path), tmp_path)
    assert catalog.get("gpt-4o-mini-tts").name == "tts-1"
    (tmp_path / "b.yaml").write_text("name: gpt-4o-mini-tts\nbackend: piper\n")
    with pytest.raises(ConfigError, match=r"b.yaml: field 'name': 'gpt-4o-mini-tts' is already defined in a.yaml"):
        load_configs(tmp_path, tmp_path)
    (tmp_path / "b.yaml").write_text("name: other\naliases: ['../x']\nbackend: piper\n")
    with pytest.raises(ConfigError, match="alias"):
        load_configs(tmp_path, tmp_path)


def test_a_batch_larger_than_what_a_container_holds_is_refused(tmp_path):
    text = "name: m\nbackend: bark\ndeploy:\n  max_concurrent_inputs: 2\n  max_batch_size: 4\n"
    with pytest.raises(ConfigError, match=r"max_batch_size \(4\) must not exceed max_concurrent_inputs \(2\)"):
        load_config_file(write(tmp_path, "big.yaml", text))
    batched = load_config_file(write(tmp_path, "ok.yaml", text.replace("max_batch_size: 4", "max_batch_size: 2")))
    assert (batched.deploy.max_batch_size, batched.deploy.batch_wait_ms) == (2, 0)
