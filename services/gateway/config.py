"""Gateway settings: flags with MESHSERVE_* environment defaults."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshserve.common import transport
from meshserve.common.errors import ConfigError
from meshserve.common.grpcutil import MiB
from meshserve.common.settings import Flags, defaults, parse_bool
from meshserve.common.transport import Transport
from meshserve.tasks.records import QueueSettings

_TASKS = QueueSettings()  # the async task defaults, as the standalone runner's


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8001
    # The same API over HTTP/1.1 and JSON (Triton's port convention); -1: off.
    http_port: int = 8000
    metrics_port: int = 8002
    port_file: str | None = None
    log_level: str = "INFO"
    model_repository: str = "models"
    batcher: str = "127.0.0.1:8011"
    # Empty: no cache service (every request computes).
    cache: str = ""
    cache_timeout_ms: int = 50
    # The in-process L1 in front of the cache service (0: none).
    l1_cache_mb: int = 64
    max_message_mb: int = 64
    # Per client connection: streams at once, idle and age limits (0: none).
    max_concurrent_streams: int = 1024
    max_connection_idle_s: float = 600.0
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 300.0
    # Requests handled at once on one ModelStreamInfer stream.
    max_stream_concurrency: int = 1024
    grace_s: float = 5.0
    # SO_REUSEPORT: several gateway processes share one port (the kernel spreads connections).
    reuse_port: bool = False
    # Async inference (meshserve.v1.AsyncInference): durable on Redis Streams with a
    # Redis URL, else an in-process queue (not durable).
    redis_url: str = ""
    async_runners: int = 1  # runner coroutines in this gateway (0: submit and read only)
    async_max_queue: int = _TASKS.max_queue
    async_result_ttl_s: float = _TASKS.result_ttl_s
    async_task_ttl_s: float = _TASKS.task_ttl_s
    async_claim_idle_s: float = _TASKS.claim_idle_s
    # As `meshserve async-runner`'s --max-deliveries and --key-prefix: a runner beside the
    # gateways must read the stream the gateways write.
    async_max_deliveries: int = _TASKS.max_deliveries
    async_key_prefix: str = _TASKS.key_prefix
    # The in-process task store (no Redis): tasks, MiB and tasks per API key held at most.
    async_max_stored: int = _TASKS.max_stored
    async_max_stored_mb: int = _TASKS.max_stored_bytes // MiB
    async_max_tasks_per_key: int = _TASKS.max_per_key
    # Protection (gateway/protection.py): API keys (empty: auth off), per-model token
    # buckets "MODEL=RATE[:BURST],...", and load shedding past this many inferences at once.
    api_keys_file: str = ""
    # Without keys, a gateway listens only on a loopback address unless this says otherwise.
    insecure: bool = False
    model_rate_limits: str = ""
    max_concurrent_requests: int = 4096
    # Requests arriving without a traceparent are sampled (logged per request) this often.
    trace_sample_ratio: float = 0.0
    # TLS on the public port (client certificates: --tls-client-auth, none by default),
    # mTLS to the batcher and cache, compression, OTLP.
    transport: Transport = Transport(tls_client_auth="none")

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port: {self.port} is not a port")
        if not -1 <= self.http_port < 65536:
            raise ConfigError(f"--http-port: {self.http_port} is not a port (-1: off)")
        if self.max_message_mb < 1:
            raise ConfigError(f"--max-message-mb: must be >= 1, got {self.max_message_mb}")
        if self.l1_cache_mb < 0:
            raise ConfigError(f"--l1-cache-mb: must be >= 0, got {self.l1_cache_mb}")
        if self.cache_timeout_ms < 1:
            raise ConfigError(f"--cache-timeout-ms: must be >= 1, got {self.cache_timeout_ms}")
        if not (self.api_keys_file or self.insecure or is_loopback(self.host)):
            raise ConfigError(
                f"--host {self.host}: refusing to serve without API keys on a non-loopback "
                "address (anyone reaching it could infer, load, unload and reroute models); "
                "give --api-keys-file (see `meshserve keys`), or --insecure to serve open "
                "anyway, or --host 127.0.0.1")
        if not self.batcher:
            raise ConfigError("--batcher: the batcher's address is required")
        if self.max_concurrent_requests < 1:
            raise ConfigError(f"--max-concurrent-requests: must be >= 1, "
                              f"got {self.max_concurrent_requests}")
        self.model_limits()
        self.connection_limits()
        if self.async_runners < 0:
            raise ConfigError(f"--async-runners: must be >= 0, got {self.async_runners}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError(f"--trace-sample-ratio: must be in [0, 1], got "
                              f"{self.trace_sample_ratio}")
        self.queue_settings()

    def connection_limits(self):
        from meshserve.common.grpcutil import ConnectionLimits

        return ConnectionLimits(self.max_concurrent_streams, self.max_connection_idle_s,
                                self.max_connection_age_s, self.max_connection_age_grace_s)

    def model_limits(self):
        from meshserve.common.ratelimit import parse_model_limits

        return parse_model_limits(self.model_rate_limits)

    def queue_settings(self) -> QueueSettings:
        return QueueSettings(self.async_max_queue, self.async_task_ttl_s,
                             self.async_result_ttl_s, self.async_claim_idle_s,
                             self.async_max_deliveries, self.async_key_prefix,
                             max_stored=self.async_max_stored,
                             max_stored_bytes=self.async_max_stored_mb * MiB,
                             max_per_key=self.async_max_tasks_per_key)


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed): reachable from this machine only."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name: whatever it resolves to


def from_args(argv: list[str] | None = None) -> Settings:
    d = defaults(Settings)
    f = Flags("meshserve gateway", "The public Open Inference Protocol v2 gRPC API.")
    f.add_service(d, host="address to bind (0.0.0.0: every interface; needs "
                  "--api-keys-file or --insecure)")
    f.add("--http-port", int, d.http_port,
          "HTTP/JSON port of the same v2 API (0: any free port, -1: off)")
    f.add("--model-repository", str, d.model_repository, "model repository folder")
    f.add("--batcher", str, d.batcher,
          "batcher: host:port, a comma list of them, or dns:///name:port (balanced)")
    f.add("--cache", str, d.cache,
          "cache service: host:port, a comma list (sharded by key) or dns:///name:port; "
          "empty: no cache")
    f.add("--cache-timeout-ms", int, d.cache_timeout_ms, "cache lookup budget per request")
    f.add("--l1-cache-mb", int, d.l1_cache_mb,
          "in-process cache of hot results in front of the cache service (0: off)")
    f.add("--max-message-mb", int, d.max_message_mb, "largest request or response message")
    f.add("--max-concurrent-streams", int, d.max_concurrent_streams,
          "calls open at once on one client connection (HTTP/2 streams)")
    f.add("--max-connection-idle-s", float, d.max_connection_idle_s,
          "close a client connection without calls after this long (0: never)")
    f.add("--max-connection-age-s", float, d.max_connection_age_s,
          "ask a client connection to reconnect after this long (0: never)")
    f.add("--max-connection-age-grace-s", float, d.max_connection_age_grace_s,
          "calls of an aged connection get this long to finish")
    f.add("--max-stream-concurrency", int, d.max_stream_concurrency,
          "requests in progress at once on one ModelStreamInfer stream")
    f.add("--grace-s", float, d.grace_s, "drain time on SIGTERM")
    f.add_bool("--reuse-port", d.reuse_port,
               "bind with SO_REUSEPORT, so several gateways share --port")
    f.add_redis_url(d.redis_url, "Redis for durable async tasks; empty: in-process queue")
    f.add("--async-runners", int, d.async_runners,
          "async task runners in this gateway (0: none; tasks run elsewhere)")
    f.add("--async-max-queue", int, d.async_max_queue, "async tasks waiting or running, at most")
    f.add("--async-result-ttl-s", float, d.async_result_ttl_s,
          "how long a finished async task's outcome is kept")
    f.add("--async-task-ttl-s", float, d.async_task_ttl_s,
          "an async task not started within this is EXPIRED")
    f.add("--async-claim-idle-s", float, d.async_claim_idle_s,
          "claim an async task whose runner has been silent this long")
    f.add("--async-max-deliveries", int, d.async_max_deliveries,
          "deliveries of an async task before it is dead-lettered (FAILED); as the runners'")
    f.add("--async-key-prefix", str, d.async_key_prefix,
          "prefix of every async task key in Redis; as the runners' --key-prefix")
    f.add("--async-max-stored", int, d.async_max_stored,
          "in-process task store (no --redis-url): tasks held at most, finished ones too")
    f.add("--async-max-stored-mb", int, d.async_max_stored_mb,
          "in-process task store: MiB of requests and results held at most")
    f.add("--async-max-tasks-per-key", int, d.async_max_tasks_per_key,
          "tasks one API key may hold at most (waiting, running, or finished and kept for "
          "twice --async-result-ttl-s), in process and in Redis")
    f.add("--trace-sample-ratio", float, d.trace_sample_ratio,
          "share of requests without a traceparent that are sampled (logged per request)")
    transport.add_flags(f, client_auth="none")
    f.add("--api-keys-file", str, d.api_keys_file,
          "JSON keys file (hashed API keys, models, priority, rate); empty: no authentication")
    f.parser.add_argument(
        "--insecure", action="store_true",
        default=parse_bool(f.env.get("MESHSERVE_INSECURE", str(d.insecure))),
        help="serve without --api-keys-file on a non-loopback --host: open to anyone "
             "[env MESHSERVE_INSECURE]")
    f.add("--model-rate-limits", str, d.model_rate_limits,
          "per-model token buckets MODEL=RATE_PER_S[:BURST],... (shared through --redis-url)")
    f.add("--max-concurrent-requests", int, d.max_concurrent_requests,
          "inferences in progress at once; past it RESOURCE_EXHAUSTED at once")
    a = f.parse(argv)
    return f.build(Settings, a, transport=transport.from_args(f, a))
