"""Settings of the cache service, from flags and MESHSERVE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common import transport
from meshserve.common.errors import ConfigError
from meshserve.common.logs import redact_url
from meshserve.common.settings import Flags, defaults
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
    d = defaults(Settings)
    flags = Flags("meshserve.cache", "The prediction cache service (meshserve.v1.Cache).", env)
    flags.add_service(d)
    flags.add_redis_url(d.redis_url, "Redis URL; empty: the in-memory backend")
    flags.add("--key-prefix", str, d.key_prefix, "prefix of every Redis key")
    flags.add("--default-ttl-s", int, d.default_ttl_s, "TTL of entries stored with ttl_s 0")
    flags.add("--max-entry-bytes", int, d.max_entry_bytes,
              "larger entries are not cached (and counted)")
    flags.add("--memory-max-entries", int, d.memory_max_entries,
              "in-memory backend: most entries held")
    flags.add("--memory-max-bytes", int, d.memory_max_bytes, "in-memory backend: most bytes held")
    flags.add("--redis-timeout-ms", int, d.redis_timeout_ms, "bound on every Redis call")
    flags.add("--redis-pool-size", int, d.redis_pool_size, "Redis connections at most")
    flags.add("--grace-s", float, d.grace_s, "grace period for in-flight calls on SIGTERM")
    transport.add_flags(flags)
    a = flags.parse(argv)
    return flags.build(Settings, a, redis_url=a.redis_url.strip(),
                       transport=transport.from_args(flags, a))
