"""Gateway settings: flags with MESHSERVE_* environment defaults."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common.errors import ConfigError
from meshserve.common.settings import Flags


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8001
    metrics_port: int = 8002
    port_file: str | None = None
    log_level: str = "INFO"
    model_repository: str = "models"
    batcher: str = "127.0.0.1:8011"
    # Empty: no cache service (every request computes).
    cache: str = ""
    cache_timeout_ms: int = 50
    max_message_mb: int = 64
    # Requests handled at once on one ModelStreamInfer stream.
    max_stream_concurrency: int = 1024
    grace_s: float = 5.0

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port: {self.port} is not a port")
        if self.max_message_mb < 1:
            raise ConfigError(f"--max-message-mb: must be >= 1, got {self.max_message_mb}")
        if self.cache_timeout_ms < 1:
            raise ConfigError(f"--cache-timeout-ms: must be >= 1, got {self.cache_timeout_ms}")
        if not self.batcher:
            raise ConfigError("--batcher: the batcher's address is required")


def from_args(argv: list[str] | None = None) -> Settings:
    d = Settings()
    f = Flags("meshserve gateway", "The public Open Inference Protocol v2 gRPC API.")
    f.add("--host", str, d.host, "address to bind")
    f.add("--port", int, d.port, "gRPC port (0: any free port)")
    f.add("--metrics-port", int, d.metrics_port, "Prometheus port (-1: off)")
    f.add("--port-file", str, None, "write the bound ports here as JSON once serving")
    f.add("--log-level", str, d.log_level, "log level")
    f.add("--model-repository", str, d.model_repository, "model repository folder")
    f.add("--batcher", str, d.batcher, "batcher address (host:port or dns:///name:port)")
    f.add("--cache", str, d.cache, "cache service address; empty: no cache")
    f.add("--cache-timeout-ms", int, d.cache_timeout_ms, "cache lookup budget per request")
    f.add("--max-message-mb", int, d.max_message_mb, "largest request or response message")
    f.add("--max-stream-concurrency", int, d.max_stream_concurrency,
          "requests in progress at once on one ModelStreamInfer stream")
    f.add("--grace-s", float, d.grace_s, "drain time on SIGTERM")
    a = f.parse(argv)
    return Settings(**{k: getattr(a, k) for k in Settings.__dataclass_fields__})
