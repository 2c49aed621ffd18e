"""`chorus models pull NAME`: fetch a model's weights from the Hugging Face hub into the models
directory, where the backends look first (and then load with HF_HUB_OFFLINE=1).

NAME is a config name (its `parameters.model` is fetched) or directly what a config would name:
- a Piper voice file such as `en_US-lessac-medium.onnx`: the voice and its `.onnx.json` from the
  `rhasspy/piper-voices` repository, saved under that name;
- a hub id such as `suno/bark-small`: the whole repository, saved in the folder of that name
  (the folder `functions/hub.py` loads before trying the hub);
- `kokoro` (or a config of backend kokoro): Kokoro's model file and voices file, from
  kokoro-onnx's release on GitHub, saved under the names the config gives them.

huggingface_hub is imported only here and only when pulling; it draws its own progress bars.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from functions.config import (
    KOKORO_MODEL_FILE,
    KOKORO_VOICES_FILE,
    ModelConfig,
    UnsafePathError,
    configless_config,
    resolve_in,
)
from functions.hub import offline
from router.errors import ChorusError

PIPER_VOICES_REPO = "rhasspy/piper-voices"
#: Where kokoro-onnx publishes kokoro-v1.0.onnx and voices-v1.0.bin (its README links them).
KOKORO_RELEASE = "https://github.com/thewh1teagle/kokoro-onnx/releases/download/model-files-v1.1"
# en_US-lessac-medium.onnx -> language en, locale en_US, speaker lessac, quality medium.
_PIPER_VOICE = re.compile(
    r"^(?P<locale>(?P<lang>[a-z]{2,3})_[A-Z]{2})-(?P<speaker>[A-Za-z0-9_]+)-(?P<quality>x_low|low|medium|high)\.onnx$"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COQUI_CATALOGUE = ("tts_models/", "vocoder_models/", "voice_conversion_models/")


class PullError(ChorusError):
    """A model that cannot be fetched, with what to do about it."""


def pull(name: str, models_dir: Path, configs: dict[str, ModelConfig] | None = None) -> list[Path]:
    """Fetch `name` (a config name, a Piper voice file or a hub id) into `models_dir`; returns
    the paths written."""
    config = (configs or {}).get(name)
    if (config.backend if config is not None else name) == "kokoro":
        return _pull_kokoro(config or configless_config(None, "kokoro"), models_dir)
    source = config.parameters.model if config is not None else name
    if not source:
        raise PullError(f"model '{name}': its config names no parameters.model to fetch")
    if _PIPER_VOICE.match(Path(source).name) and (config is None or config.backend == "piper"):
        return [_pull_piper_voice(source, models_dir)]
    if source.startswith(_COQUI_CATALOGUE):
        raise PullError(
            f"'{source}' is a Coqui catalogue name: Coqui fetches it itself the first time the "
            f"model loads with network access (into $TTS_HOME, or $HF_HOME for XTTS)"
        )
    if _HUB_ID.match(source):
        return [_pull_repository(source, models_dir)]
    raise PullError(
        f"cannot pull '{name}': expected a config name, a Piper voice file such as "
        f"en_US-lessac-medium.onnx, or a Hugging Face hub id such as suno/bark-small"
    )


def _hub():
    if offline():
        raise PullError("HF_HUB_OFFLINE is set: unset it to download models")
    try:
        import huggingface_hub
    except ImportError:
        raise PullError(
            "pulling models needs huggingface_hub: pip install huggingface_hub "
            "(or pip install 'chorus-tts[modal]')"
        ) from None
    return huggingface_hub


def _target(models_dir: Path, relative: str) -> Path:
    try:
        return resolve_in(models_dir, relative)
    except UnsafePathError as exc:
        raise PullError(str(exc)) from exc


def _reachable(hub, repo_id: str) -> None:
    """One quick request before downloading: the download functions retry a lost connection
    for about half a minute, while this fails at once when offline."""
    _fetch(lambda: hub.HfApi().repo_info(repo_id, timeout=10), repo_id)


def _pull_piper_voice(file_name: str, models_dir: Path) -> Path:
    hub = _hub()
    target = _target(models_dir, file_name)
    _reachable(hub, PIPER_VOICES_REPO)
    voice = _PIPER_VOICE.match(target.name)
    assert voice is not None
    folder = f"{voice['lang']}/{voice['locale']}/{voice['speaker']}/{voice['quality']}"
    staging = target.parent / ".pull"
    try:
        for suffix in ("", ".json"):
            remote = f"{folder}/{target.name}{suffix}"
            downloaded = _fetch(
                lambda remote=remote: hub.hf_hub_download(PIPER_VOICES_REPO, remote, local_dir=staging),
                f"{PIPER_VOICES_REPO}/{remote}",
            )
            # The repository's folders are dropped: the config names the bare file.
            Path(downloaded).replace(target.with_name(target.name + suffix))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _pull_repository(repo_id: str, models_dir: Path) -> Path:
    hub = _hub()
    target = _target(models_dir, repo_id)
    _reachable(hub, repo_id)
    _fetch(lambda: hub.snapshot_download(repo_id, local_dir=target), repo_id)
    return target


def _pull_kokoro(config: ModelConfig, models_dir: Path) -> list[Path]:
    import httpx

    written = []
    released = (f"{KOKORO_RELEASE}/{KOKORO_MODEL_FILE}", f"{KOKORO_RELEASE}/{KOKORO_VOICES_FILE}")
    for url, name in zip(released, config.kokoro_files(), strict=True):
        target = _target(models_dir, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
                response.raise_for_status()
                with partial.open("wb") as sink:
                    for data in response.iter_bytes(1 << 20):
                        sink.write(data)
            partial.replace(target)
        except httpx.HTTPError as exc:
            raise PullError(
                f"cannot download {url} ({exc.__class__.__name__}: {exc}); Kokoro needs "
                f"{' and '.join(Path(n).name for n in config.kokoro_files())} in the models directory: "
                f"fetch them from {KOKORO_RELEASE} by hand where this machine cannot"
            ) from exc
        finally:
            partial.unlink(missing_ok=True)
        written.append(target)
    return written


def _fetch(download, what: str):
    """Run one huggingface_hub download, its failures as a PullError a person can act on."""
    from huggingface_hub import errors

    try:
        return download()
    except errors.RepositoryNotFoundError as exc:
        raise PullError(f"'{what}' does not exist on the Hugging Face hub (or is private: set HF_TOKEN)") from exc
    # Before EntryNotFoundError, which it subclasses: no connection, and nothing cached.
    except errors.LocalEntryNotFoundError as exc:
        raise PullError(f"cannot download '{what}': the Hugging Face hub cannot be reached (offline?)") from exc
    except errors.EntryNotFoundError as exc:
        raise PullError(f"'{what}' does not exist on the Hugging Face hub") from exc
    except errors.HfHubHTTPError as exc:
        raise PullError(f"cannot download '{what}': {exc}") from exc
    except Exception as exc:
        # Connection failures surface as the HTTP client's own exception types, which
        # huggingface_hub does not wrap.
        raise PullError(
            f"cannot download '{what}': the Hugging Face hub cannot be reached "
            f"({exc.__class__.__name__}: {exc})"
        ) from exc
