"""The task queue in this process (the embedded default): not durable, the same contract
as the Redis backend (retries, dead letters, deadlines and TTLs by the same clock)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshserve.common.errors import NotFound, Overloaded
from meshserve.tasks.queues.contract import (
    DEAD_LETTER_MAXLEN,
    DeadLetter,
    Watchers,
    full_message,
    quota_message,
)
from meshserve.tasks.records import (
    CODE_CANCELLED,
    CODE_DEADLINE_EXCEEDED,
    Delivery,
    NewTask,
    QueueSettings,
    Started,
    State,
    TaskView,
    check_task_id,
    deadline_ms,
    new_task_id,
    now_ms,
    view_at,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _MemTask:
    fields: dict[str, str]
    request: bytes
    entry_id: str
    response: bytes | None = None
    runs: int = 0
    finishes: int = 0
    owner: str = ""
    idempotency_key: str = ""  # forgotten with the task (no scan of every key)

    @property
    def size(self) -> int:
        return len(self.request) + len(self.response or b"")


@dataclass
class MemoryQueue:
    """The same API in this process: not durable (tasks are lost when it stops)."""

    settings: QueueSettings
    clock: Callable[[], int] = now_ms  # the wall clock in ms: deadlines and TTLs
    durable: bool = False
    watchers: Watchers = field(default_factory=Watchers)
    tasks: dict[str, _MemTask] = field(default_factory=dict)
    _idem: dict[str, str] = field(default_factory=dict)
    _waiting: deque = field(default_factory=deque)  # Delivery, in submission order
    _open: set[str] = field(default_factory=set)  # entry ids not yet acknowledged
    _drops: list = field(default_factory=list)  # heap of (forget_at_ms, task_id)
    _ready: asyncio.Condition | None = None
    _seq: int = 0
    _bytes: int = 0  # of every stored task's request and response
    _per_owner: dict[str, int] = field(default_factory=dict)  # stored tasks per API key
    _dead: deque = field(default_factory=lambda: deque(maxlen=DEAD_LETTER_MAXLEN))

    def _cond(self) -> asyncio.Condition:
        if self._ready is None:
            self._ready = asyncio.Condition()
        return self._ready

    async def start(self) -> None:
        log.warning("async inference runs on an in-process queue: NOT durable (tasks are lost "
                    "when this process stops); set --redis-url for durable tasks")

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    def _forget_old(self, now: int) -> None:
        """Each forgotten task in O(log n): its heap entry, its idempotency key, its counts."""
        while self._drops and self._drops[0][0] <= now:
            _at, tid = heapq.heappop(self._drops)
            task = self.tasks.get(tid)
            if task is not None and int(task.fields.get("forget_ms", "0")) <= now:
                del self.tasks[tid]
                if task.idempotency_key and self._idem.get(task.idempotency_key) == tid:
                    del self._idem[task.idempotency_key]
                self._bytes -= task.size
                left = self._per_owner[task.owner] - 1
                if left:
                    self._per_owner[task.owner] = left
                else:
                    del self._per_owner[task.owner]

    def _check_room(self, tasks: Sequence[NewTask]) -> None:
        """The store's bounds (count, bytes) and each key's quota, for the tasks to add."""
        s = self.settings
        size = sum(len(t.request) for t in tasks)
        if len(self.tasks) + len(tasks) > s.max_stored or self._bytes + size > s.max_stored_bytes:
            raise Overloaded(
                f"the task store is full ({len(self.tasks)} tasks, {self._bytes} bytes; at most "
                f"{s.max_stored} and {s.max_stored_bytes}); retry later")
        adding: dict[str, int] = {}
        for t in tasks:
            adding[t.owner] = adding.get(t.owner, 0) + 1
        for owner, n in adding.items():
            held = self._per_owner.get(owner, 0)
            if owner and held + n > s.max_per_key:
                raise Overloaded(quota_message(held, s.max_per_key))

    def _keep_until(self, task_id: str, at_ms: int) -> None:
        self.tasks[task_id].fields["forget_ms"] = str(at_ms)
        heapq.heappush(self._drops, (at_ms, task_id))

    async def submit(self, tasks: Sequence[NewTask]) -> list[str]:
        now = self.clock()
        self._forget_old(now)
        fresh = [t for t in tasks if not t.idempotency_key or t.idempotency_key not in self._idem]
        if fresh and len(self._open) + len(fresh) > self.settings.max_queue:
            raise Overloaded(full_message(len(self._open), len(tasks), self.settings.max_queue))
        self._check_room(fresh)
        ids = []
        rttl = int(self.settings.result_ttl_s * 1000)
        for t in tasks:
            if t.idempotency_key and t.idempotency_key in self._idem:
                ids.append(self._idem[t.idempotency_key])
                continue
            tid = new_task_id()
            self._seq += 1
            deadline = deadline_ms(now, self.settings, t.timeout_s)
            entry = f"{now}-{self._seq}"
            self.tasks[tid] = _MemTask(
                {"state": str(int(State.PENDING)), "submitted_ms": str(now),
                 "deadline_ms": str(deadline), "owner": t.owner}, t.request, entry,
                owner=t.owner, idempotency_key=t.idempotency_key)
            self._bytes += len(t.request)
            self._per_owner[t.owner] = self._per_owner.get(t.owner, 0) + 1
            self._keep_until(tid, deadline + 2 * rttl)
            if t.idempotency_key:
                self._idem[t.idempotency_key] = tid
            self._open.add(entry)
            self._waiting.append(Delivery(entry, tid, 1))
            ids.append(tid)
        async with self._cond():
            self._cond().notify_all()
        return ids

    def _task(self, task_id: str) -> _MemTask:
        check_task_id(task_id)
        self._forget_old(self.clock())
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"unknown task '{task_id}' (never submitted, or forgotten after "
                           "twice its result TTL)")
        return task

    async def get(self, task_id: str) -> TaskView:
        task = self._task(task_id)
        return view_at(task_id, task.fields, task.response, self.clock())

    async def deadline(self, task_id: str) -> int:
        return int(self._task(task_id).fields["deadline_ms"])

    def _finish(self, task_id: str, state: State, code: int, message: str) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        rttl = int(self.settings.result_ttl_s * 1000)
        task.fields.update(state=str(int(state)), finished_ms=str(now),
                           expires_ms=str(now + rttl), error_code=str(code), error_message=message)
        self._bytes -= len(task.request)
        task.request = b""
        self._open.discard(task.entry_id)
        self._keep_until(task_id, now + 2 * rttl)
        self.watchers.notify(task_id)

    async def cancel(self, task_id: str) -> TaskView:
        task = self._task(task_id)
        if not State(int(task.fields["state"])).done:
            self._finish(task_id, State.CANCELLED, CODE_CANCELLED, "cancelled by the client")
        return await self.get(task_id)

    async def length(self) -> int:
        return len(self._open)

    async def listen(self) -> None:
        pass

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        return list(self._dead)[:count]

    async def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        cond = self._cond()
        async with cond:
            if not self._waiting:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait_for(lambda: bool(self._waiting)), block_s)
            out = []
            while self._waiting and len(out) < count:
                out.append(self._waiting.popleft())
            return out

    async def claim(self, consumer: str, count: int) -> list[Delivery]:
        return []  # runners live in this process: none can die alone

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        pass

    async def begin(self, d: Delivery) -> Started | str:
        task = self.tasks.get(d.task_id)
        if task is None or d.entry_id not in self._open:
            return "done" if task is not None else "gone"
        state = State(int(task.fields["state"]))
        if state.done:
            return "done"
        deadline = int(task.fields["deadline_ms"])
        if self.clock() >= deadline:
            self._finish(d.task_id, State.EXPIRED, CODE_DEADLINE_EXCEEDED,
                         "the task waited past its deadline")
            return "expired"
        task.fields["state"] = str(int(State.RUNNING))
        task.runs += 1
        self.watchers.notify(d.task_id)
        return Started(task.request, deadline, int(task.fields["submitted_ms"]))

    async def finish(self, d: Delivery, state: State, response: bytes, code: int,
                     message: str) -> bool:
        task = self.tasks.get(d.task_id)
        if task is None or State(int(task.fields["state"])) != State.RUNNING:
            self._open.discard(d.entry_id)
            return False
        if state == State.SUCCEEDED:
            task.response = response
            self._bytes += len(response)
        task.finishes += 1
        self._finish(d.task_id, state, code, message)
        return True

    async def release(self, d: Delivery, code: int, message: str) -> None:
        """In process there is no claim: a transient failure is retried at once, up to
        max_deliveries, then FAILED."""
        task = self.tasks.get(d.task_id)
        if task is None or State(int(task.fields["state"])) != State.RUNNING:
            return
        if d.deliveries >= self.settings.max_deliveries:
            # As Redis does when the next delivery begins: dead-lettered, FAILED.
            why = f"gave up after {self.settings.max_deliveries} deliveries: {message}"
            self._dead.append(DeadLetter(d.task_id, d.deliveries + 1, why))
            self._finish(d.task_id, State.FAILED, code, why)
            return
        task.fields.update(state=str(int(State.PENDING)), error_code=str(code),
                           error_message=message)
        self._seq += 1
        self._open.discard(d.entry_id)
        task.entry_id = f"{self.clock()}-{self._seq}"  # a new delivery, as a claim makes one
        self._open.add(task.entry_id)
        self._waiting.append(Delivery(task.entry_id, d.task_id, d.deliveries + 1))
        self.watchers.notify(d.task_id)
        async with self._cond():
            self._cond().notify_all()
