"""Per model version statistics (Triton's model statistics) and the batcher's Prometheus
metrics. Pure domain: the servicer turns ModelStats into StatisticsResponse."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(int(ns), 0)


@dataclass(slots=True)
class ModelStats:
    model: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    # executed batch size -> compute time of the batches that ran at that size
    batch_stats: dict[int, Duration] = field(default_factory=dict)

    def copy(self) -> ModelStats:
        return ModelStats(
            self.model, self.version, self.last_inference_ms, self.inference_count,
            self.execution_count, Duration(self.success.count, self.success.ns),
            Duration(self.fail.count, self.fail.ns), Duration(self.queue.count, self.queue.ns),
            Duration(self.compute_infer.count, self.compute_infer.ns),
            {k: Duration(v.count, v.ns) for k, v in self.batch_stats.items()},
        )


_OUTCOMES = {
    "OK": "ok", "DEADLINE_EXCEEDED": "deadline", "RESOURCE_EXHAUSTED": "overloaded",
    "CANCELLED": "cancelled", "UNAVAILABLE": "unavailable", "INVALID_ARGUMENT": "invalid",
    "NOT_FOUND": "not_found",
}


def outcome_of(code_name: str) -> str:
    """The requests_total outcome label of a status code name."""
    return _OUTCOMES.get(code_name, "error")


@dataclass(slots=True)
class _Bound:
    depth: object
    batch_size: object
    queue_wait: object
    requests: dict[str, object]  # status code name -> requests_total child


class Statistics:
    """Counts what the batcher did, per model version, and exports Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._models: dict[tuple[str, str], ModelStats] = {}
        self.queue_depth = Gauge(
            "meshserve_batcher_queue_depth", "Requests waiting in a model version's queue",
            ["model", "version"], registry=self.registry)
        self.batch_size = Histogram(
            "meshserve_batcher_batch_size", "Rows per executed batch", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.queue_wait = Histogram(
            "meshserve_batcher_queue_wait_seconds", "Time a request waited in the queue",
            ["model"],
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0),
            registry=self.registry)
        self.requests = Counter(
            "meshserve_batcher_requests", "Requests answered, by outcome",
            ["model", "outcome"], registry=self.registry)
        self._children: dict[tuple[str, str], _Bound] = {}

    def _bound(self, model: str, version: str) -> _Bound:
        """The metric children of a model version, looked up once (labels() per request
        costs more than the update itself)."""
        bound = self._children.get((model, version))
        if bound is None:
            bound = self._children[(model, version)] = _Bound(
                self.queue_depth.labels(model, version), self.batch_size.labels(model),
                self.queue_wait.labels(model), {})
        return bound

    def _get(self, model: str, version: str) -> ModelStats:
        key = (model, version)
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = ModelStats(model, version)
        return stats

    def set_depth(self, model: str, version: str, depth: int) -> None:
        self._bound(model, version).depth.set(depth)

    def record_batch(self, model: str, version: str, rows: int, executed_batch_size: int,
                     compute_ns: int) -> None:
        s = self._get(model, version)
        s.execution_count += 1
        s.inference_count += rows
        s.compute_infer.add(compute_ns)
        s.batch_stats.setdefault(executed_batch_size or rows, Duration()).add(compute_ns)
        s.last_inference_ms = int(time.time() * 1000)
        self._bound(model, version).batch_size.observe(rows)

    def record_request(self, model: str, version: str, code_name: str, total_ns: int,
                       queue_ns: int | None) -> None:
        """One answered request; code_name is "OK" or the error's status code name."""
        s = self._get(model, version)
        (s.success if code_name == "OK" else s.fail).add(total_ns)
        bound = self._bound(model, version)
        if queue_ns is not None:
            s.queue.add(queue_ns)
            bound.queue_wait.observe(queue_ns / 1e9)
        counter = bound.requests.get(code_name)
        if counter is None:
            counter = bound.requests[code_name] = self.requests.labels(
                model, outcome_of(code_name))
        counter.inc()

    def ensure(self, model: str, version: str) -> None:
        """Reports a known version even before it ran anything."""
        self._get(model, version)

    def snapshot(self, model: str = "", version: str = "") -> list[ModelStats]:
        return [
            s.copy() for (m, v), s in sorted(self._models.items())
            if (not model or m == model) and (not version or v == version)
        ]
