"""Settings of the standalone async runner (`meshserve async-runner`)."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common import transport
from meshserve.common.errors import ConfigError
from meshserve.common.logs import redact_url
from meshserve.common.settings import Flags, defaults
from meshserve.common.transport import PLAINTEXT, Transport
from meshserve.tasks.records import QueueSettings

_QUEUE = QueueSettings()  # the queue defaults (the gateway's --async-* flags share them)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8041  # grpc.health.v1 only
    metrics_port: int = 8042
    port_file: str | None = None
    log_level: str = "INFO"
    redis_url: str = ""
    model_repository: str = "models"
    batcher: str = "127.0.0.1:8011"
    cache: str = ""
    cache_timeout_ms: int = 50
    runners: int = 1
    concurrency: int = 256  # tasks in progress at once per runner
    max_queue: int = _QUEUE.max_queue
    task_ttl_s: float = _QUEUE.task_ttl_s
    result_ttl_s: float = _QUEUE.result_ttl_s
    claim_idle_s: float = _QUEUE.claim_idle_s
    max_deliveries: int = _QUEUE.max_deliveries
    key_prefix: str = _QUEUE.key_prefix
    grace_s: float = 5.0
    transport: Transport = PLAINTEXT  # TLS (mTLS), compression, OTLP

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"--redis-url {redact_url(self.redis_url)!r}: a standalone runner "
                              "needs Redis "
                              "(redis://, rediss:// or unix://)")
        if not 0 <= self.port < 65536 or not -1 <= self.metrics_port < 65536:
            raise ConfigError("--port must be in 0..65535 and --metrics-port in -1..65535")
        if self.runners < 1 or self.concurrency < 1:
            raise ConfigError("--runners and --concurrency must be >= 1")
        if self.cache_timeout_ms < 1:
            raise ConfigError(f"--cache-timeout-ms: must be >= 1, got {self.cache_timeout_ms}")
        self.queue_settings()

    def queue_settings(self) -> QueueSettings:
        return QueueSettings(self.max_queue, self.task_ttl_s, self.result_ttl_s,
                             self.claim_idle_s, self.max_deliveries, self.key_prefix)


def from_args(argv: list[str] | None = None) -> Settings:
    d = defaults(Settings)  # not Settings(): it refuses the empty redis_url
    f = Flags("meshserve async-runner",
              "Runs async inference tasks from Redis Streams through the batcher (and cache).")
    f.add_service(d, host="address to bind (grpc.health.v1 only; 0.0.0.0: every interface)",
                  port="gRPC health port (0: any free port)")
    f.add_redis_url(d.redis_url, "Redis holding the task queue")
    f.add("--model-repository", str, d.model_repository, "model repository folder")
    f.add("--batcher", str, d.batcher, "batcher address")
    f.add("--cache", str, d.cache, "cache service address; empty: no cache")
    f.add("--cache-timeout-ms", int, d.cache_timeout_ms, "cache lookup budget per task")
    f.add("--runners", int, d.runners, "runner coroutines (consumers) in this process")
    f.add("--concurrency", int, d.concurrency, "tasks in progress at once per runner")
    f.add("--max-queue", int, d.max_queue, "tasks waiting or running, at most")
    f.add("--task-ttl-s", float, d.task_ttl_s, "a task not started within this is EXPIRED")
    f.add("--result-ttl-s", float, d.result_ttl_s, "how long outcomes are kept")
    f.add("--claim-idle-s", float, d.claim_idle_s,
          "claim a task whose runner has been silent this long")
    f.add("--max-deliveries", int, d.max_deliveries,
          "deliveries before a task is dead-lettered (FAILED)")
    f.add("--key-prefix", str, d.key_prefix, "prefix of every Redis key")
    f.add("--grace-s", float, d.grace_s, "drain time on SIGTERM")
    transport.add_flags(f)
    a = f.parse(argv)
    return f.build(Settings, a, transport=transport.from_args(f, a))
