"""What the batcher knows of its model workers, and which worker runs what. Pure domain.

A WorkerLink is the transport to one worker (connection.py implements it over gRPC);
the pool keeps each worker's reported status and our own outstanding batches on it,
picks the READY worker with the least outstanding work for a batch, and the worker with
the most free capacity for a load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from meshserve.batcher.adaptive import LatencyProfile
from meshserve.batcher.records import Batch, BatchReply

Key = tuple[str, str]  # (model, version)


# A batch computing at least this long is heavy (see PooledWorker.slots).
HEAVY_BATCH_S = 0.002

@dataclass(frozen=True, slots=True)
class HeldModel:
    model: str
    version: str
    state: str  # READY or LOADING
    byte_size: int = 0
    graph_buckets: tuple[int, ...] = ()  # batch sizes replaying a CUDA graph
    eager_buckets: tuple[tuple[int, str], ...] = ()  # (batch size, why) where capture failed


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's WatchStatus update, as the domain sees it."""

    worker_id: str
    device: str
    models: tuple[HeldModel, ...]
    memory_used_bytes: int
    memory_limit_bytes: int
    max_models: int
    in_flight: int
    # Shutting down: it finishes what it holds and gets no new batch or load.
    draining: bool = False


class WorkerLink(Protocol):
    address: str

    async def execute(self, batch: Batch) -> BatchReply: ...
    async def load(self, model: str, version: str, reload: bool = False) -> None: ...
    async def unload(self, model: str, version: str) -> None: ...


@dataclass(eq=False, slots=True)
class PooledWorker:
    link: WorkerLink
    # Batches we keep in flight on it; 0: by device (see slots).
    max_in_flight: int
    connected: bool = False
    report: WorkerReport | None = None
    outstanding: int = 0
    # Models we know the worker has but its last report may not show yet / has dropped.
    loading: set[Key] = field(default_factory=set)
    drifted: set[Key] = field(default_factory=set)
    profiles: dict[Key, LatencyProfile] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.link.address

    @property
    def draining(self) -> bool:
        return self.report is not None and self.report.draining

    def state_of(self, key: Key) -> str | None:
        """READY, LOADING, or None (not held, disconnected or draining)."""
        if not self.connected or self.draining:
            return None
        if self.report is not None and key not in self.drifted:
            for m in self.report.models:
                if (m.model, m.version) == key:
                    return m.state
        return "LOADING" if key in self.loading else None

    def ready(self, key: Key) -> bool:
        return self.state_of(key) == "READY"

    def slots(self, key: Key) -> int:
        """Batches of a model in flight at once on this worker. By default two on a GPU
        (the copies of one batch overlap the compute of the other). On a CPU, one while a
        batch computes faster than HEAVY_BATCH_S: a second small batch would only compete
        for the cores the rest of the mesh needs, while with one in flight the queue
        fills during compute; two once batches are heavy, so that two cores compute."""
        if self.max_in_flight:
            return self.max_in_flight
        if self.report is not None and self.report.device.startswith("cuda"):
            return 2
        measured = self.profiles[key].measured() if key in self.profiles else {}
        heavy = measured and max(measured.values()) >= HEAVY_BATCH_S
        return 2 if heavy else 1

    def free_slots(self, key: Key) -> int:
        return self.slots(key) - self.outstanding

    def free_memory_bytes(self) -> int:
        if self.report is None or not self.report.memory_limit_bytes:
            return 1 << 62
        return self.report.memory_limit_bytes - self.report.memory_used_bytes

    def model_count(self) -> int:
        return len(self.report.models) if self.report else 0

    def profile(self, key: Key) -> LatencyProfile:
        p = self.profiles.get(key)
        if p is None:
            p = self.profiles[key] = LatencyProfile()
        return p


class WorkerPool:
    """Every worker the batcher talks to; notifies waiters on any change."""

    def __init__(self) -> None:
        self.workers: dict[str, PooledWorker] = {}
        self._changed = asyncio.Event()
        # Called on every change (the batcher wakes its queues: a slot may have freed).
        self.listeners: list[Callable[[], None]] = []

    def add(self, link: WorkerLink, max_in_flight: int) -> PooledWorker:
        w = self.workers[link.address] = PooledWorker(link, max_in_flight)
        return w

    def remove(self, address: str) -> PooledWorker | None:
        w = self.workers.pop(address, None)
        if w is not None:
            w.connected = False
            self.notify()
        return w

    def notify(self) -> None:
        """Wakes everything waiting on the pool (a status, slot or connection change)."""
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self.listeners:
            listener()

    async def wait_change(self, timeout_s: float | None = None) -> None:
        """Blocks until the next change, or timeout_s."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass

    def connected(self) -> list[PooledWorker]:
        return [w for w in self.workers.values() if w.connected]

    def holders(self, key: Key) -> list[PooledWorker]:
        return [w for w in self.workers.values() if w.ready(key)]

    def loading(self, key: Key) -> list[PooledWorker]:
        return [w for w in self.workers.values() if w.state_of(key) == "LOADING"]

    def idle(self, key: Key) -> bool:
        """A worker holding the model has nothing outstanding from us."""
        return any(w.outstanding == 0 for w in self.holders(key))

    def pick(self, key: Key, exclude: frozenset[str] = frozenset()) -> PooledWorker | None:
        """The READY worker with a free slot and the least outstanding work."""
        free = [w for w in self.holders(key) if w.free_slots(key) > 0 and w.address not in exclude]
        if not free:
            return None
        return min(free, key=lambda w: (w.outstanding, w.address))

    def pick_for_load(self, key: Key) -> PooledWorker | None:
        """The connected worker with the most free memory, then the fewest models."""
        candidates = [w for w in self.connected()
                      if not w.draining and w.state_of(key) is None]
        if not candidates:
            return None
        return max(candidates, key=lambda w: (w.free_memory_bytes(), -w.model_count(), w.address))

    def acquire(self, w: PooledWorker) -> None:
        w.outstanding += 1

    def release(self, w: PooledWorker) -> None:
        w.outstanding = max(w.outstanding - 1, 0)
        self.notify()

    def update(self, address: str, report: WorkerReport | None, connected: bool) -> None:
        w = self.workers.get(address)
        if w is None:
            return
        w.connected = connected
        if report is not None:
            w.report = report
            held = {(m.model, m.version) for m in report.models}
            w.loading -= held
            w.drifted.clear()
        self.notify()
