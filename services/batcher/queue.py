"""The per-model-version batch queue: priority levels, deadlines, a bounded size, and the
policy that decides when a batch closes. Pure domain: no grpc, no protobuf.

Decisions are synchronous and take the time from an injectable clock, so they are unit
tested without sleeping; `next_batch` is the event-driven async wrapper the dispatcher uses.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.batcher.records import Batch, Request, join_rows
from meshserve.common.errors import Cancelled, DeadlineExceeded, InvalidInput, MeshError, Overloaded
from meshserve.common.repository import BatchingConfig

# What must match for requests to share a batch: each input's datatype and its shape past
# dimension 0 (inputs in the model's declared order).
ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


def shape_key(request: Request) -> ShapeKey:
    return tuple([(t.datatype, t.shape[1:]) for t in request.inputs])


_DEFAULTS = BatchingConfig()  # the one source of the batching defaults


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """A model version's BatchingConfig as the batcher applies it (with its overrides)."""

    max_batch_size: int
    max_queue_delay_us: int = _DEFAULTS.max_queue_delay_us
    preferred_batch_sizes: tuple[int, ...] = _DEFAULTS.preferred_batch_sizes
    priority_levels: int = _DEFAULTS.priority_levels
    default_priority_level: int = _DEFAULTS.default_priority_level
    default_timeout_us: int = _DEFAULTS.default_timeout_us
    max_queue_size: int = _DEFAULTS.max_queue_size
    adaptive: bool = _DEFAULTS.adaptive
    target_latency_us: int = _DEFAULTS.target_latency_us

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if not 1 <= self.default_priority_level <= self.priority_levels:
            raise ValueError(
                f"default_priority_level {self.default_priority_level} not in "
                f"1..{self.priority_levels}"
            )

    @property
    def batch_rows(self) -> int:
        """Rows one batch may hold (1 request when the model does not batch)."""
        return max(self.max_batch_size, 1)

    @classmethod
    def from_config(
        cls,
        max_batch_size: int,
        batching: BatchingConfig,
        *,
        max_batch_size_override: int = 0,
        max_queue_delay_us_override: int = 0,
        max_queue_size_override: int = 0,
        adaptive_override: bool | None = None,
    ) -> BatchPolicy:
        """The model's config, with the batcher's flags (0 / None: keep the config's)."""
        size = max_batch_size
        if max_batch_size_override and max_batch_size > 0:
            size = min(max_batch_size_override, max_batch_size)
        return cls(
            max_batch_size=size,
            max_queue_delay_us=max_queue_delay_us_override or batching.max_queue_delay_us,
            preferred_batch_sizes=tuple(p for p in batching.preferred_batch_sizes if p <= size),
            priority_levels=batching.priority_levels,
            default_priority_level=batching.default_priority_level,
            default_timeout_us=batching.default_timeout_us,
            max_queue_size=max_queue_size_override or batching.max_queue_size,
            adaptive=batching.adaptive if adaptive_override is None else adaptive_override,
            target_latency_us=batching.target_latency_us,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """How the next batch should be formed: at most `target_rows`, waiting at most
    `max_wait_s` after the oldest queued request for it to fill."""

    target_rows: int
    max_wait_s: float


class BatchQueue:
    """Requests of one model version waiting for a batch.

    Each priority level keeps one FIFO per shape key: a batch joins only requests of the
    head request's shape key (the oldest of the highest level), so requests of another
    shape wait for a batch of their own, served in the order their oldest request came."""

    def __init__(self, model: str, version: str, policy: BatchPolicy,
                 now: Callable[[], float] = time.monotonic):
        self.model, self.version, self.policy, self.now = model, version, policy, now
        self._levels: list[dict[ShapeKey, deque[Request]]] = [
            {} for _ in range(policy.priority_levels)]
        # Queued requests and their shape keys, by identity (request ids come from each
        # client and may repeat across clients).
        self._queued: dict[Request, ShapeKey] = {}
        self._deadlines: list[tuple[float, int, Request]] = []
        self._rows = 0
        self._rows_by_key: dict[ShapeKey, int] = {}
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self.on_drop: Callable[[Request, MeshError], None] | None = None

    # ------------------------------------------------------------------ intake

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def rows(self) -> int:
        return self._rows

    def level_of(self, priority: int) -> int:
        if priority == 0:
            return self.policy.default_priority_level
        if priority > self.policy.priority_levels:
            raise InvalidInput(
                f"priority {priority} is out of range for model '{self.model}' "
                f"(1..{self.policy.priority_levels}, 0 for the default)"
            )
        return priority

    def deadline_of(self, timeout_us: int) -> float | None:
        limits = [t for t in (timeout_us, self.policy.default_timeout_us) if t > 0]
        return self.now() + min(limits) / 1e6 if limits else None

    def check_rows(self, rows: int) -> None:
        if self.policy.max_batch_size > 0 and rows > self.policy.max_batch_size:
            raise InvalidInput(
                f"request has {rows} rows, more than the max_batch_size "
                f"{self.policy.max_batch_size} of model '{self.model}'"
            )

    def put(self, request: Request) -> None:
        """Queues a request; Overloaded at once when the queue is full."""
        self.check_rows(request.rows)
        if len(self._queued) >= self.policy.max_queue_size:
            raise Overloaded(
                f"the queue of model '{self.model}' version {self.version} is full: "
                f"{len(self._queued)} requests queued, limit {self.policy.max_queue_size}"
            )
        request.seq = next(self._seq)
        key = self._queued[request] = shape_key(request)
        level = self._levels[request.level - 1]
        group = level.get(key)
        if group is None:
            group = level[key] = deque()
        group.append(request)
        self._rows += request.rows
        self._rows_by_key[key] = self._rows_by_key.get(key, 0) + request.rows
        if request.deadline_s is not None:
            heapq.heappush(self._deadlines, (request.deadline_s, request.seq, request))
        self._changed.set()

    def cancel(self, request: Request) -> bool:
        """Drops a queued request at once, answering it CANCELLED. False if not queued."""
        request.cancelled = True
        if request not in self._queued:
            return False
        self._remove(request)
        self._drop(request, Cancelled("request cancelled by its caller"))
        self.wake()
        return True

    def set_policy(self, policy: BatchPolicy) -> None:
        """A reloaded config. Queued requests stay, in order; those of a level past the new
        number of levels join the lowest."""
        if policy.priority_levels != self.policy.priority_levels:
            levels: list[dict[ShapeKey, deque[Request]]] = [
                {} for _ in range(policy.priority_levels)]
            for r in sorted(self._queued, key=lambda r: r.seq):
                r.level = min(r.level, policy.priority_levels)
                levels[r.level - 1].setdefault(self._queued[r], deque()).append(r)
            self._levels = levels
        self.policy = policy
        self.wake()

    def wake(self) -> None:
        """Something the policy depends on changed (a worker slot freed, a cancel)."""
        self._changed.set()

    # ------------------------------------------------------------------ policy

    def purge(self) -> int:
        """Drops cancelled and expired requests, answering them. Returns how many."""
        dropped = 0
        now = self.now()
        while self._deadlines and (self._deadlines[0][0] <= now or self._deadlines[0][2].done):
            _, _, r = heapq.heappop(self._deadlines)
            if r in self._queued and not r.done:
                self._remove(r)
                self._drop(r, DeadlineExceeded(
                    f"request timed out after {(now - r.enqueued_s) * 1e3:.1f} ms in the queue "
                    f"of model '{self.model}' version {self.version}"))
                dropped += 1
        for level in self._levels:
            emptied = []
            for key, group in level.items():
                while group and group[0].done:
                    r = group.popleft()
                    self._forget(r)
                    self._drop(r, Cancelled("request cancelled by its caller"))
                    dropped += 1
                if not group:
                    emptied.append(key)
            for key in emptied:
                del level[key]
        return dropped

    def next_deadline_s(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def plan(self, profile_plan: Plan | None = None) -> Plan:
        if profile_plan is not None:
            return profile_plan
        return Plan(self.policy.batch_rows, self.policy.max_queue_delay_us / 1e6)

    def ready_in(self, idle: bool, plan: Plan | None = None) -> float | None:
        """Seconds until a batch should close (0: now), None when nothing is queued.

        A lone request goes at once when a worker holding the model is idle; otherwise
        the batch closes when full, at a preferred size, or when the oldest request has
        waited the window."""
        self.purge()
        if not self._queued:
            return None
        if idle:
            return 0.0
        rows = self._rows_by_key[self._queued[self._head()]]
        if rows >= self.plan(plan).target_rows or self.policy.max_batch_size == 0:
            return 0.0
        if plan is None and any(p <= rows for p in self.policy.preferred_batch_sizes):
            return 0.0
        oldest = min(g[0].enqueued_s for level in self._levels for g in level.values())
        wait = oldest + self.plan(plan).max_wait_s - self.now()
        deadline = self.next_deadline_s()
        if deadline is not None:
            wait = min(wait, deadline - self.now())
        return max(wait, 0.0)

    def take(self, batch_id: int, plan: Plan | None = None) -> Batch | None:
        """Closes a batch of the head request's shape key: highest level first, FIFO within
        a level, whole requests only."""
        self.purge()
        if not self._queued:
            return None
        key = self._queued[self._head()]
        available = self._rows_by_key[key]
        limit = min(self.plan(plan).target_rows, self.policy.batch_rows)
        # An adaptive plan replaces the preferred sizes.
        preferred = [p for p in self.policy.preferred_batch_sizes if p <= available]
        if plan is None and preferred and available < limit:
            limit = max(preferred)
        taken: list[Request] = []
        rows = 0
        for level in self._levels:
            group = level.get(key)
            while group:
                r = group[0]
                if r.done:
                    group.popleft()
                    self._forget(r)
                    self._drop(r, Cancelled("request cancelled by its caller"))
                    continue
                if taken and (rows + r.rows > limit or self.policy.max_batch_size == 0):
                    break
                group.popleft()
                self._forget(r)
                taken.append(r)
                rows += r.rows
            else:
                level.pop(key, None)
                continue
            break
        if not taken:
            return None
        return make_batch(batch_id, taken, self.now(), self.policy.max_batch_size > 0)

    async def wait_nonempty(self) -> None:
        while True:
            self.purge()
            if self._queued:
                return
            self._changed.clear()
            await self._changed.wait()

    async def wait_change(self, timeout_s: float | None) -> None:
        """Blocks until the queue changes or timeout_s passes."""
        self._changed.clear()
        if timeout_s is not None and timeout_s <= 0:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def next_batch(self, batch_id: int, idle: Callable[[], bool],
                         plan: Callable[[], Plan | None] = lambda: None) -> Batch | None:
        """Waits (event-driven, on monotonic deadlines) until the policy closes a batch.
        Returns None when the queue empties meanwhile (cancels, expiries)."""
        while True:
            p = plan()
            wait = self.ready_in(idle(), p)
            if wait is None:
                return None
            if wait <= 0:
                return self.take(batch_id, p)
            await self.wait_change(wait)

    def fail_all(self, error: MeshError) -> int:
        """Answers every queued request with error (no worker can serve them)."""
        failed = 0
        for level in self._levels:
            for group in level.values():
                while group:
                    r = group.popleft()
                    self._forget(r)
                    self._drop(r, error if not r.done else Cancelled("request cancelled"))
                    failed += 1
            level.clear()
        return failed

    # ------------------------------------------------------------------ helpers

    def _head(self) -> Request:
        """The oldest request of the highest non-empty level (the queue is not empty)."""
        level = next(level for level in self._levels if level)
        return min((g[0] for g in level.values()), key=lambda r: r.seq)

    def _remove(self, r: Request) -> None:
        level, key = self._levels[r.level - 1], self._queued[r]
        level[key].remove(r)
        if not level[key]:
            del level[key]
        self._forget(r)

    def _forget(self, r: Request) -> None:
        key = self._queued.pop(r, None)
        if key is not None:
            self._rows -= r.rows
            left = self._rows_by_key[key] - r.rows
            if left:
                self._rows_by_key[key] = left
            else:
                del self._rows_by_key[key]

    def _drop(self, r: Request, error: MeshError) -> None:
        if self.on_drop is not None:
            self.on_drop(r, error)
        elif not r.future.done():
            r.future.set_exception(error)


def make_batch(batch_id: int, requests: list[Request], now_s: float, batching: bool) -> Batch:
    """Joins the requests' inputs once per input (np.concatenate) into one batch."""
    # Intake put every request's inputs in the model's declared order.
    inputs = [
        join_rows([r.inputs[i] for r in requests]) if batching else requests[0].inputs[i]
        for i in range(len(requests[0].inputs))
    ]
    wanted: set[str] = set()
    every = False
    for r in requests:
        if not r.outputs:
            every = True
        wanted.update(r.outputs)
    outputs = () if every else tuple(sorted(wanted))
    return Batch(
        batch_id=batch_id, model=requests[0].model, version=requests[0].version,
        requests=tuple(requests), inputs=tuple(inputs), outputs=outputs,
        rows=sum(r.rows for r in requests), closed_s=now_s,
    )
