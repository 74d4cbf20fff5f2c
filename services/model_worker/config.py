"""Settings of the model worker: flags (or MESHSERVE_* variables), validated at start."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from meshserve.common import transport
from meshserve.common.settings import Flags, defaults, parse_list
from meshserve.common.transport import PLAINTEXT, Transport


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8021
    metrics_port: int = 8022
    port_file: str | None = None
    log_level: str = "INFO"
    # "cpu" or "cuda:N" once resolved (resolve_device turns the flag's "auto"/"cuda" into
    # one of them).
    device: str = "cpu"
    model_repository: str = "models"
    max_models: int = 8
    # 0: no byte bound on loaded models.
    max_memory_mb: int = 0
    # torch intra-op threads. 1 by default: concurrency comes from --max-in-flight batches,
    # each on its own thread; small-batch inference of small models gains little from
    # intra-op parallelism, and more threads per batch oversubscribe the cores
    # (max_in_flight x threads should stay <= the cores the pod is given).
    threads: int = 1
    max_in_flight: int = 2
    cuda_graphs: bool = True
    # Entries: "name" (versions its policy selects), "name:version", or "all".
    load: tuple[str, ...] = ()
    worker_id: str | None = None
    grace_s: float = 5.0
    transport: Transport = PLAINTEXT  # TLS (mTLS), compression, OTLP

    @property
    def max_memory_bytes(self) -> int:
        return self.max_memory_mb * 1024 * 1024

    def worker_name(self, port: int) -> str:
        return self.worker_id or f"{socket.gethostname()}:{port}"


def resolve_device(device: str, cuda_available: bool, cuda_count: int) -> str:
    """'auto' -> cuda:0 if available else cpu; 'cuda' -> cuda:0. Raises ValueError."""
    d = device.strip().lower()
    if d == "auto":
        return "cuda:0" if cuda_available else "cpu"
    if d == "cpu":
        return "cpu"
    if d == "cuda":
        d = "cuda:0"
    if d.startswith("cuda:") and d[5:].isdigit():
        index = int(d[5:])
        if not cuda_available:
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if index >= cuda_count:
            raise ValueError(f"--device {device}: only {cuda_count} CUDA device(s) present")
        return f"cuda:{index}"
    raise ValueError(f"--device {device!r}: expected cpu, cuda:N or auto")


def from_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    d = defaults(Settings)
    flags = Flags("meshserve.model_worker", "Runs batches of a model on one device.", env)
    flags.add_service(d)
    # Not the field's default: the flag's "auto" is resolved to the field's cpu or cuda:N.
    flags.add("--device", str, "auto", "cpu, cuda:N, or auto (cuda:0 if available)")
    flags.add("--model-repository", str, d.model_repository, "folder of <model>/config.json")
    flags.add("--max-models", int, d.max_models, "most model versions loaded at once")
    flags.add("--max-memory-mb", int, d.max_memory_mb,
              "byte budget of loaded models in MiB (0: unbounded)")
    flags.add("--threads", int, d.threads, "torch intra-op threads per batch")
    flags.add("--max-in-flight", int, d.max_in_flight, "batches executed concurrently")
    flags.add_bool("--cuda-graphs", d.cuda_graphs, "capture one CUDA graph per batch bucket on CUDA")
    flags.add("--load", parse_list, d.load, "models to load at start: name, name:version or all")
    flags.add("--worker-id", str, d.worker_id, "name reported in status (default hostname:port)")
    flags.add("--grace-s", float, d.grace_s, "seconds in-flight batches get to finish on SIGTERM")
    transport.add_flags(flags)
    a = flags.parse(argv)

    def check(ok: bool, message: str) -> None:
        if not ok:
            flags.parser.error(message)

    check(a.max_models >= 1, f"--max-models must be >= 1, got {a.max_models}")
    check(a.max_memory_mb >= 0, f"--max-memory-mb must be >= 0, got {a.max_memory_mb}")
    check(a.threads >= 1, f"--threads must be >= 1, got {a.threads}")
    check(a.max_in_flight >= 1, f"--max-in-flight must be >= 1, got {a.max_in_flight}")
    check(a.grace_s >= 0, f"--grace-s must be >= 0, got {a.grace_s}")
    check(Path(a.model_repository).is_dir(),
          f"--model-repository {a.model_repository!r} is not a directory")
    import torch

    try:
        device = resolve_device(a.device, torch.cuda.is_available(), torch.cuda.device_count())
    except ValueError as e:
        flags.parser.error(str(e))
    for entry in a.load:
        name, _, version = entry.partition(":")
        check(bool(name) and (not version or version.isdigit()),
              f"--load entry {entry!r}: expected name, name:version or all")
    return flags.build(Settings, a, device=device,
                       transport=transport.from_args(flags, a))
