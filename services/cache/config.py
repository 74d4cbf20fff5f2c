"""Settings of the cache service, from flags and MESHSERVE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common import transport
from meshserve.common.errors import ConfigError
from meshserve.common.logs import redact_url
from meshserve.common.settings import Flags
from meshserve.common.transport import PLAINTEXT, Transport

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8031
    metrics_port: int = 8032
    port_file: str | None = None
    log_level: str = "INFO"
    redis_url: str = ""  # empty: the in-memory backend
    key_prefix: str = "meshserve"
    default_ttl_s: int = 300
    max_entry_bytes: int = MiB
    memory_max_entries: int = 100_000
    memory_max_bytes: int = 256 * MiB
    redis_timeout_ms: int = 50
    redis_pool_size: int = 32
    grace_s: float = 5.0
    transport: Transport = PLAINTEXT  # TLS (mTLS), compression, OTLP

    def __post_init__(self) -> None:
        positive = ("default_ttl_s", "max_entry_bytes", "memory_max_entries", "memory_max_bytes",
                    "redis_timeout_ms", "redis_pool_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got "
                                  f"{getattr(self, name)}")
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535:
            raise ConfigError("--port must be in 0..65535 and --metrics-port in -1..65535")
        if not self.key_prefix or set("{}*?[]") & set(self.key_prefix):
            raise ConfigError(f"--key-prefix {self.key_prefix!r} is empty or has {{}}*?[]")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"--redis-url {redact_url(self.redis_url)!r}: expected redis://, rediss:// or unix://")

    @property
    def backend_name(self) -> str:
        return "redis" if self.redis_url else "memory"


def from_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    flags = Flags("meshserve.cache", "The prediction cache service (meshserve.v1.Cache).", env)
    flags.add("--host", str, "127.0.0.1", "address to bind (0.0.0.0: every interface)")
    flags.add("--port", int, 8031, "gRPC port (0: ephemeral)")
    flags.add("--metrics-port", int, 8032, "Prometheus port (0: ephemeral, -1: disabled)")
    flags.add("--port-file", str, None, "write the bound ports here as JSON once serving")
    flags.add("--log-level", str, "INFO", "log level")
    flags.add("--redis-url", str, flags.env.get("REDIS_URL", ""),
              "Redis URL (also env REDIS_URL); empty: the in-memory backend")
    flags.add("--key-prefix", str, "meshserve", "prefix of every Redis key")
    flags.add("--default-ttl-s", int, 300, "TTL of entries stored with ttl_s 0")
    flags.add("--max-entry-bytes", int, MiB, "larger entries are not cached (and counted)")
    flags.add("--memory-max-entries", int, 100_000, "in-memory backend: most entries held")
    flags.add("--memory-max-bytes", int, 256 * MiB, "in-memory backend: most bytes held")
    flags.add("--redis-timeout-ms", int, 50, "bound on every Redis call")
    flags.add("--redis-pool-size", int, 32, "Redis connections at most")
    flags.add("--grace-s", float, 5.0, "grace period for in-flight calls on SIGTERM")
    transport.add_flags(flags)
    a = flags.parse(argv)
    try:
        return Settings(
            host=a.host, port=a.port, metrics_port=a.metrics_port, port_file=a.port_file,
            log_level=a.log_level, redis_url=a.redis_url.strip(), key_prefix=a.key_prefix,
            default_ttl_s=a.default_ttl_s, max_entry_bytes=a.max_entry_bytes,
            memory_max_entries=a.memory_max_entries, memory_max_bytes=a.memory_max_bytes,
            redis_timeout_ms=a.redis_timeout_ms, redis_pool_size=a.redis_pool_size,
            grace_s=a.grace_s, transport=transport.from_args(flags, a),
        )
    except ConfigError as exc:
        flags.parser.error(str(exc))
        raise  # unreachable: error() exits
