"""The batcher's settings: flags with MESHSERVE_* environment defaults, validated at start."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.batcher.core import BatcherOptions
from meshserve.common import transport
from meshserve.common.settings import Flags, defaults, parse_bool, parse_list
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
    # How long requests wait for a worker to come back when every worker is gone.
    rejoin_wait_s: float = defaults(BatcherOptions).rejoin_wait_s
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
            "rejoin_wait_s": self.rejoin_wait_s >= 0,
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
    d = defaults(Settings)
    f = Flags("meshserve.batcher", "Dynamic batching between gateways and model workers.", env)
    f.add_service(d)
    f.add("--workers", parse_list, d.workers,
          "model workers: host:port or dns:///name:port, comma list")
    f.add("--model-repository", str, d.model_repository, "model repository root")
    f.add("--load", parse_list, d.load, "models to make sure are loaded at start: names, or all")
    f.add("--max-retries", int, d.max_retries, "retries of a batch whose worker failed")
    f.add("--max-in-flight-per-worker", int, d.max_in_flight_per_worker,
          "batches in flight on one worker (0: 2 on a GPU; on a CPU 1, or 2 once batches take >= 2 ms)")
    f.add("--max-batch-size", int, d.max_batch_size,
          "override of the configs' max_batch_size (0: config)")
    f.add("--max-queue-delay-us", int, d.max_queue_delay_us,
          "override of max_queue_delay_us (0: config)")
    f.add("--max-queue-size", int, d.max_queue_size, "override of max_queue_size (0: config)")
    f.add("--adaptive", _optional_bool, d.adaptive, "override of batching.adaptive (empty: config)")
    f.add("--grace-s", float, d.grace_s, "grace period on shutdown")
    f.add("--startup-wait-s", float, d.startup_wait_s, "wait this long for a first worker at start")
    f.add("--rejoin-wait-s", float, d.rejoin_wait_s,
          "when every worker that was connected is gone (a restart), requests wait this long "
          "for one to come back before UNAVAILABLE (0: at once)")
    f.add_redis_url(d.redis_url,
                    "the mesh's Redis (redis://host:6379/0): the cluster's model control "
                    "(loaded models, default versions) is read and watched there; empty: "
                    "gateways write it to this batcher")
    transport.add_flags(f)
    a = f.parse(argv)
    return f.build(Settings, a, transport=transport.from_args(f, a))
