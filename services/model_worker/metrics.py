"""Prometheus metrics of the model worker, in its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_COMPUTE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                    2.5)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.batch_size = Histogram(
            "meshserve_worker_batch_size", "Rows per executed batch",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "meshserve_worker_compute_seconds", "Model compute time per batch",
            ["model", "version"], buckets=_COMPUTE_BUCKETS, registry=self.registry,
        )
        self.models_loaded = Gauge(
            "meshserve_worker_models_loaded", "Model versions loaded and ready",
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "meshserve_worker_model_load_seconds", "Load and warmup time per model version",
            ["model", "version"], buckets=_LOAD_BUCKETS, registry=self.registry,
        )

    def executed(self, model: str, version: str, rows: int, compute_ns: int) -> None:
        self.batch_size.observe(rows)
        self.compute_seconds.labels(model, version).observe(compute_ns / 1e9)

    def loaded(self, model: str, version: str, load_ns: int) -> None:
        self.model_load_seconds.labels(model, version).observe(load_ns / 1e9)
