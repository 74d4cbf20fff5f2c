"""Prometheus metrics of async inference (registered on the owning process's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TaskMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.queue_length = Gauge(
            "meshserve_tasks_queue_length", "Async tasks waiting or running (sampled)",
            registry=registry,
        )
        self.submitted = Counter(
            "meshserve_tasks_submitted", "Async tasks accepted by Submit/SubmitBatch",
            registry=registry,
        )
        self.outcomes = Counter(
            "meshserve_tasks_outcomes",
            "Async task outcomes seen by this process's runners: succeeded, failed, expired, "
            "dead_lettered, retried (transient error, redelivered later), skipped (cancelled "
            "or already done when delivered), dropped (cancelled while running, or finished "
            "elsewhere first)",
            ["outcome"], registry=registry,
        )
        self.submit_to_done_seconds = Histogram(
            "meshserve_tasks_submit_to_done_seconds", "Time from Submit to a task's completion",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        )
