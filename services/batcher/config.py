"""The batcher's settings: flags with MESHSERVE_* environment defaults, validated at start."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common import transport
from meshserve.common.settings import Flags, parse_bool, parse_list
from meshserve.common.transport import PLAINTEXT, Transport


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8011
    metrics_port: int = 8012
    port_file: str | None = None
    log_level: str = "INFO"
    workers: tuple[str, ...] = ()
    model_repository: str = "models"
    load: tuple[str, ...] = ()  # model names, or ("all",)
    max_retries: int = 2
    max_in_flight_per_worker: int = 0  # 0: by device and batch cost (workers.PooledWorker.slots)
    # Overrides of the model configs' batching (0 / None: the config's).
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    adaptive: bool | None = None
    grace_s: float = 5.0
    # How long start-up waits for a first worker before serving anyway.
    startup_wait_s: float = 30.0
    transport: Transport = PLAINTEXT  # TLS (mTLS), compression, OTLP
    # The mesh's Redis: cluster model control lives there (else on this batcher's board).
    redis_url: str = ""

    def __post_init__(self) -> None:
        checks = {
            "port": self.port >= 0, "metrics_port": self.metrics_port >= -1,
            "max_retries": self.max_retries >= 0,
            "max_in_flight_per_worker": self.max_in_flight_per_worker >= 0,
            "max_batch_size": self.max_batch_size >= 0,
            "max_queue_delay_us": self.max_queue_delay_us >= 0,
            "max_queue_size": self.max_queue_size >= 0,
            "startup_wait_s": self.startup_wait_s >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}: invalid value {getattr(self, name)!r}")
        for w in self.workers:
            target = w[len("dns:"):].lstrip("/") if w.startswith("dns:") else w
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--workers: {w!r} is not host:port or dns:///name:port")


def _optional_bool(value: str) -> bool | None:
    return None if str(value).strip() == "" else parse_bool(value)


def from_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    f = Flags("meshserve.batcher", "Dynamic batching between gateways and model workers.", env)
    f.add("--host", str, "127.0.0.1", "address to bind (0.0.0.0: every interface)")
    f.add("--port", int, 8011, "gRPC port (0: ephemeral)")
    f.add("--metrics-port", int, 8012, "Prometheus port (-1: disabled, 0: ephemeral)")
    f.add("--port-file", str, None, "write the bound ports here (JSON) once serving")
    f.add("--log-level", str, "INFO", "log level")
    f.add("--workers", parse_list, (), "model workers: host:port or dns:///name:port, comma list")
    f.add("--model-repository", str, "models", "model repository root")
    f.add("--load", parse_list, (), "models to make sure are loaded at start: names, or all")
    f.add("--max-retries", int, 2, "retries of a batch whose worker failed")
    f.add("--max-in-flight-per-worker", int, 0,
          "batches in flight on one worker (0: 2 on a GPU; on a CPU 1, or 2 once batches take >= 2 ms)")
    f.add("--max-batch-size", int, 0, "override of the configs' max_batch_size (0: config)")
    f.add("--max-queue-delay-us", int, 0, "override of max_queue_delay_us (0: config)")
    f.add("--max-queue-size", int, 0, "override of max_queue_size (0: config)")
    f.add("--adaptive", _optional_bool, None, "override of batching.adaptive (empty: config)")
    f.add("--grace-s", float, 5.0, "grace period on shutdown")
    f.add("--startup-wait-s", float, 30.0, "wait this long for a first worker at start")
    f.add("--redis-url", str, f.env.get("REDIS_URL", ""),
          "the mesh's Redis (redis://host:6379/0): the cluster's model control (loaded "
          "models, default versions) is read and watched there; empty: gateways write it "
          "to this batcher (also env REDIS_URL)")
    transport.add_flags(f)
    a = f.parse(argv)
    return Settings(
        host=a.host, port=a.port, metrics_port=a.metrics_port, port_file=a.port_file,
        log_level=a.log_level, workers=tuple(a.workers), model_repository=a.model_repository,
        load=tuple(a.load), max_retries=a.max_retries,
        max_in_flight_per_worker=a.max_in_flight_per_worker, max_batch_size=a.max_batch_size,
        max_queue_delay_us=a.max_queue_delay_us, max_queue_size=a.max_queue_size,
        adaptive=a.adaptive, grace_s=a.grace_s, startup_wait_s=a.startup_wait_s,
        transport=transport.from_args(f, a), redis_url=a.redis_url,
    )
