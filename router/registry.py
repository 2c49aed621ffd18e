"""The model configs a router serves, and how a request's fields select and override them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from functions.catalog import ModelCatalog
from functions.config import CONFIGLESS_MODELS, ModelConfig, load_configs
from functions.protocol import InvalidRequestError, ModelNotFoundError
from router.errors import InvalidRequest, ModelNotFound

# Every OpenAI client must send one of these; a model that does not map a name to one of its own
# voices speaks it with its default voice rather than refusing the request.
OPENAI_VOICES = frozenset(
    ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"]
)


class ModelRegistry(ModelCatalog):
    """The catalog, as the router serves it: its errors are the API's, and the config-less
    models that have served a request are listed with the configs."""

    def __init__(self, configs: list[ModelConfig], models_dir: Path, configless: int = CONFIGLESS_MODELS):
        super().__init__(configs, models_dir, configless)
        #: Config-less models that have served a request, least recently used first.
        self._served: OrderedDict[tuple[str, str], ModelConfig] = OrderedDict()

    @classmethod
    def from_dir(cls, configs_dir: Path, models_dir: Path, configless: int = CONFIGLESS_MODELS) -> ModelRegistry:
        return cls(load_configs(configs_dir, models_dir), models_dir, configless)

    def all(self) -> list[ModelConfig]:
        """The configs, then the config-less models loaded now (they are listed nowhere else)."""
        return [*self.configs(), *self._served.values()]

    def get(self, name: str | None, backend: str | None = None, configless: bool = False) -> ModelConfig:
        try:
            return super().get(name, backend, configless)
        except InvalidRequestError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        except ModelNotFoundError as exc:
            raise ModelNotFound(str(exc), param="model") from None

    def metric_name(self, config: ModelConfig) -> str:
        """The model's name in metrics: a config's name, and a config-less model's once it has
        served a request; until then none (a name a client made up, for a file that is not there,
        would stay in the metrics for good)."""
        return config.name if not config.configless or (config.name, config.backend) in self._served else ""

    def served(self, config: ModelConfig) -> None:
        """`config` (a config-less model) has served a request: list it, within the bound."""
        key = (config.name, config.backend)
        self._served[key] = config
        self._served.move_to_end(key)
        while len(self._served) > self.configless:
            self._served.popitem(last=False)

    @staticmethod
    def voice_for(config: ModelConfig, voice: str | None) -> str | None:
        """The request's voice mapped through the config, or the config's own voice."""
        if voice is None:
            return config.tts.voice
        if voice in config.voices:
            return config.voices[voice]
        if voice in OPENAI_VOICES:
            return config.tts.voice
        return voice
