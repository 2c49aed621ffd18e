"""What batching did, per model, in Prometheus's text format: the worker serves it at GET /metrics.
Written out here rather than with prometheus_client, which the router has and the backends'
images do not: two histograms do not justify another package in seven images' locks."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
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

    def lines(self, name: str, model: str) -> list[str]:
        label = f'model="{_escape(model)}"'
        lines = [f'{name}_bucket{{{label},le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts, strict=True)]
        lines.append(f'{name}_bucket{{{label},le="+Inf"}} {self.count}')
        lines += [f"{name}_sum{{{label}}} {self.total:g}", f"{name}_count{{{label}}} {self.count}"]
        return lines


class BatchMetrics:
    def __init__(self) -> None:
        self._sizes: dict[str, _Histogram] = defaultdict(lambda: _Histogram(SIZE_BUCKETS))
        self._waits: dict[str, _Histogram] = defaultdict(lambda: _Histogram(WAIT_BUCKETS))

    def observer(self, model: str):
        def observe(size: int, waits: list[float]) -> None:
            self._sizes[model].observe(size)
            for seconds in waits:
                self._waits[model].observe(seconds)

        return observe

    def exposition(self) -> str:
        lines = [
            "# HELP chorus_batch_size Chunks of text generated together, per generation",
            "# TYPE chorus_batch_size histogram",
        ]
        for model, histogram in sorted(self._sizes.items()):
            lines += histogram.lines("chorus_batch_size", model)
        lines += [
            "# HELP chorus_batch_wait_seconds Time a chunk of text waited for its generation to start",
            "# TYPE chorus_batch_wait_seconds histogram",
        ]
        for model, histogram in sorted(self._waits.items()):
            lines += histogram.lines("chorus_batch_wait_seconds", model)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
