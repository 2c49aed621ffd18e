"""Runners carry a synthesis request to a backend and bring its PCM back.

One interface, one implementation per deployment mode (`local.py` in this process, `http.py`
to backend workers, `docker.py` to workers it starts and stops itself, `modal.py` to Modal
functions), so the rest of the router never knows where
a backend runs. Each implementation is imported only in the mode that uses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from functions.config import ModelConfig
from functions.protocol import Spoken, SynthesisRequest
from functions.streams import Stream
from router.metrics import Metrics

if TYPE_CHECKING:
    from router.voices import SharedVolume


@dataclass
class PcmStream:
    sample_rate: int
    #: Closed by whoever holds it, read or not: that stops the synthesis behind it. PCM, and
    #: word times where the request asked for them and the backend measures them.
    audio: Stream[Spoken]


class Runner(ABC):
    @abstractmethod
    async def start(self, preload: list[ModelConfig]) -> None:
        """Make the given models ready before traffic arrives."""

    @abstractmethod
    def is_ready(self) -> bool: ...

    @abstractmethod
    async def stream(self, config: ModelConfig, request: SynthesisRequest) -> PcmStream:
        """Start synthesising one chunk of text; PCM arrives through the returned stream."""

    @abstractmethod
    async def voices(self, config: ModelConfig) -> list[str] | None:
        """The model's voices as its backend names them; None where only starting the backend
        could tell (a Modal model none of whose containers has run)."""

    def observe(self, metrics: Metrics) -> None:  # noqa: B027 - most runners report nothing of their own
        """Record the runner's own figures (docker mode's cold starts) in `metrics`."""

    def hold(self, config: ModelConfig) -> Callable[[], None]:
        """A request uses `config`'s backend from now until it calls what this returns, between
        its chunks too; a runner that stops idle workers (docker mode) keeps that one."""
        return _released

    def capacity(self, config: ModelConfig) -> int:
        """Syntheses of this model that may run at once, wherever it runs."""
        return config.deploy.max_concurrent_inputs

    def models_volume(self) -> SharedVolume | None:
        """The models directory as a volume other hosts see changes to only once committed, or
        None where they see them at once (one disk, or a bind mount)."""
        return None

    async def close(self) -> None:  # noqa: B027 - most runners hold nothing to release
        """Release connections and models."""


def _released() -> None:
    pass
