"""Prometheus metrics: what the router serves, how fast, and what its backends cost.

Each app gets its own registry, so several apps in one process (tests, tools) never mix
figures. Route labels are route templates (`/v1/text-to-speech/{voice_id}`) and unknown paths
count as `other`: a label per raw path would let any client grow the series without bound.
"""

from __future__ import annotations

import contextvars
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from functions.batch_metrics import BatchMetrics

# The *_created series would double the output and no dashboard here reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

#: Per request, what the speech path learns that the middleware cannot see (the model).
_request_labels: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "chorus_request_labels", default=None
)


def note_model(model: str) -> None:
    labels = _request_labels.get()
    if labels is not None:
        labels["model"] = model


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chorus_requests", "HTTP requests answered", ["route", "status", "model"], registry=r
        )
        self.latency = Histogram(
            "chorus_request_duration_seconds", "Time to the last byte of the response",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.first_byte = Histogram(
            "chorus_time_to_first_byte_seconds", "Time to the first byte of the response body",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.audio_seconds = Counter(
            "chorus_audio_seconds", "Seconds of audio synthesised", ["model"], registry=r
        )
        self.real_time_factor = Histogram(
            "chorus_real_time_factor",
            "Wall seconds of synthesis per second of audio, per request (below 1 is faster "
            "than real time)", ["model"], buckets=_RTF_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "chorus_in_flight_requests", "Synthesis requests running, per model", ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "chorus_queue_depth", "Synthesis requests waiting for a busy model", ["model"],
            registry=r,
        )
        self.cache = Counter(
            "chorus_cache_requests", "Synthesis cache lookups", ["result"], registry=r
        )
        self.cache_bytes = Gauge("chorus_cache_bytes", "Bytes held in the synthesis cache", registry=r)
        self.backend_errors = Counter(
            "chorus_backend_errors", "Failed backend calls", ["model", "code"], registry=r
        )
        self.cold_starts = Counter(
            "chorus_cold_starts", "Worker containers started on demand (docker mode)", ["backend"], registry=r
        )
        self.cold_start_seconds = Histogram(
            "chorus_cold_start_seconds",
            "A cold start's phases: the container's start, then until its worker is ready (its model loaded)",
            ["backend", "phase"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.workers_running = Gauge(
            "chorus_workers_running", "Worker containers running (docker mode)", ["backend"], registry=r
        )
        self.rejected = Counter(
            "chorus_rejected_requests", "Requests refused by admission control (429/503)",
            ["model"], registry=r,
        )

    def add_batches(self, batches: BatchMetrics) -> None:
        """Serve the batching of the backends this process hosts (local mode)."""
        self.registry.register(_BatchCollector(batches))

    def cold_start(self, backend: str, container_seconds: float, ready_seconds: float) -> None:
        self.cold_starts.labels(backend).inc()
        self.cold_start_seconds.labels(backend, "container").observe(container_seconds)
        self.cold_start_seconds.labels(backend, "ready").observe(ready_seconds)
        self.workers_running.labels(backend).set(1)


class _BatchCollector:
    """functions.batch_metrics' histograms, read at each scrape."""

    def __init__(self, batches: BatchMetrics):
        self.batches = batches

    def collect(self):
        for (name, help_text), by_model in self.batches.histograms():
            family = HistogramMetricFamily(name, help_text, labels=["model"])
            for model, histogram in sorted(by_model.items()):
                buckets = [(str(float(bound)), count) for bound, count in zip(histogram.buckets, histogram.counts,
                                                                              strict=True)]
                family.add_metric([model], [*buckets, ("+Inf", histogram.count)], sum_value=histogram.total)
            yield family


def _route_name(scope: Scope, routes: list[BaseRoute]) -> str:
    """The template of the route that served the request, or that would have served it had a
    middleware (API key, body size) not answered first."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    # path_format: the template without convertors ({voice_id}, not {voice_id:voice_id}).
    return getattr(route, "path_format", None) or "other"


class MetricsMiddleware:
    """Counts every HTTP response, with its status, latency and time to first byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        labels: dict[str, str] = {}
        token = _request_labels.set(labels)
        status = 500
        first_byte: float | None = None

        async def counting_send(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and first_byte is None and message.get("body"):
                first_byte = time.perf_counter() - start
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            failed = True
            raise
        finally:
            _request_labels.reset(token)
            name = _route_name(scope, self.routes)
            # A stream that broke after its status line went out is no success, whatever it said.
            code = "aborted" if failed and first_byte is not None else str(status)
            self.metrics.requests.labels(name, code, labels.get("model", "")).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
            if first_byte is not None:
                self.metrics.first_byte.labels(name).observe(first_byte)
