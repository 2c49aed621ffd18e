"""What batching did, per model: the sizes of the batches served and how long each chunk of text
waited for its generation. The router in local mode adds them to its own registry
(router/metrics.py); a worker serves them at GET /metrics in Prometheus's text format, written out
here because the backends' images do not have prometheus_client, and two histograms do not justify
another package in seven images' locks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Each histogram's name and help.
SIZE = ("chorus_batch_size", "Chunks of text generated together, per generation")
WAIT = ("chorus_batch_wait_seconds", "Time a chunk of text waited for its generation to start")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    #: Observations at or below each bucket's bound (cumulative, as Prometheus counts them).
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1


class BatchMetrics:
    def __init__(self) -> None:
        self._sizes: dict[str, Histogram] = defaultdict(lambda: Histogram(SIZE_BUCKETS))
        self._waits: dict[str, Histogram] = defaultdict(lambda: Histogram(WAIT_BUCKETS))

    def observer(self, model: str):
        def observe(size: int, waits: list[float]) -> None:
            self._sizes[model].observe(size)
            for seconds in waits:
                self._waits[model].observe(seconds)

        return observe

    def histograms(self) -> Iterator[tuple[tuple[str, str], dict[str, Histogram]]]:
        """Each histogram's (name, help) and its figures by model."""
        yield SIZE, dict(self._sizes)
        yield WAIT, dict(self._waits)

    def exposition(self) -> str:
        lines = []
        for (name, help_text), by_model in self.histograms():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for model, histogram in sorted(by_model.items()):
                # As prometheus_client writes them: `le` first, bounds as floats.
                label = f'model="{_escape(model)}"'
                lines += [f'{name}_bucket{{le="{float(bound)}",{label}}} {count}'
                          for bound, count in zip(histogram.buckets, histogram.counts, strict=True)]
                lines += [f'{name}_bucket{{le="+Inf",{label}}} {histogram.count}',
                          f"{name}_sum{{{label}}} {histogram.total:g}", f"{name}_count{{{label}}} {histogram.count}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
