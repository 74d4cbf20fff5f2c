"""The task queues: durable on Redis Streams, or in process (the embedded default).

Redis layout (prefix P, default "meshserve:tasks"):
  P:queue          stream of task ids; consumer group "runners". An entry is removed (XACK +
                   XDEL) once its task is done, so XLEN is the tasks waiting or running.
  P:task:<id>      hash: state, request (serialized protobuf, dropped when done), times,
                   error, owner (the submitting key's hash), runs (starts), finishes
                   (completions: 1 at most). TTL.
  P:result:<id>    the serialized ModelInferResponse, TTL result_ttl_s.
  P:idem:<key>     idempotency key -> task id (SET NX), as long-lived as the task.
  P:dead           dead-letter stream: tasks given up after max_deliveries.
  P:events         pub/sub channel: the id of every task whose state changed (for Watch).

Every transition is one Lua script, so it is atomic: a task completes at most once even
when a slow runner's entry was claimed by another (execution is at least once, completion
exactly once). For Redis Cluster, put a hash tag in the prefix ("{tasks}") so that every
key of a script lives in one slot. No grpc and no pickle here; payloads are opaque bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from meshserve.common.backoff import Backoff
from meshserve.common.errors import NotFound, Overloaded, Unavailable
from meshserve.tasks.records import (
    CODE_CANCELLED,
    CODE_DEADLINE_EXCEEDED,
    CODE_INTERNAL,
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

GROUP = "runners"
DEAD_LETTER_MAXLEN = 10_000
_VIEW_FIELDS = ("state", "submitted_ms", "deadline_ms", "finished_ms", "expires_ms",
                "error_code", "error_message", "owner")


def consumer_name(index: int) -> str:
    """Unique per runner coroutine and process (a restarted runner is a new consumer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{index}-{new_task_id()[:6]}"


def full_message(length: int, adding: int, max_queue: int) -> str:
    return (f"the task queue is full: {length} tasks queued, {adding} more would exceed "
            f"the bound of {max_queue}; retry later")


class Watchers:
    """Local events for Watch: notify(task_id) wakes every watcher of that task."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[task_id]

    def notify(self, task_id: str) -> None:
        for event in self._events.get(task_id, ()):
            event.set()


class TaskQueue(Protocol):
    durable: bool
    settings: QueueSettings
    watchers: Watchers

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def submit(self, tasks: Sequence[NewTask]) -> list[str]: ...
    async def get(self, task_id: str) -> TaskView: ...
    async def deadline(self, task_id: str) -> int: ...
    async def cancel(self, task_id: str) -> TaskView: ...
    async def length(self) -> int: ...
    async def listen(self) -> None:
        """Makes sure state changes from any process reach `watchers`."""

    # The runner's side.
    async def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]: ...
    async def claim(self, consumer: str, count: int) -> list[Delivery]: ...
    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None: ...
    async def begin(self, d: Delivery) -> Started | str:
        """Started (the runner owns the task now) or why not: gone, done, expired, dead."""

    async def finish(self, d: Delivery, state: State, response: bytes, code: int,
                     message: str) -> bool:
        """Completes a RUNNING task and acknowledges; False when it was already done."""

    async def release(self, d: Delivery, code: int, message: str) -> None:
        """A transient failure: back to PENDING, unacknowledged; claimed again after
        claim_idle_s (one more delivery)."""


# ---------------------------------------------------------------------------- Redis

_LUA_PRELUDE = """
local function fmt(x) return string.format('%d', x) end
local function finish(task, now, ttl, state, code, msg)
  redis.call('HSET', task, 'state', state, 'finished_ms', fmt(now), 'expires_ms', fmt(now + ttl),
             'error_code', code, 'error_message', msg)
  redis.call('HDEL', task, 'request')
  redis.call('PEXPIRE', task, fmt(2 * ttl))
end
"""

# KEYS: stream, then (task, idem) per task. ARGV: max_queue, now, n, result_ttl, then
# (task_id, has_idem, deadline, request, owner) per task. -> {1, ids...} or {0, queue length}
_SUBMIT = _LUA_PRELUDE + """
local maxq, now, n, rttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh = 0
for i = 1, n do
  if ARGV[4 + (i - 1) * 5 + 2] == '0' or redis.call('EXISTS', KEYS[2 * i + 1]) == 0 then
    fresh = fresh + 1
  end
end
local len = redis.call('XLEN', KEYS[1])
if fresh > 0 and len + fresh > maxq then return {0, len} end
local out = {1}
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local tid, deadline = ARGV[b + 1], tonumber(ARGV[b + 3])
  local keep = fmt(deadline - now + 2 * rttl)
  local existing = false
  if ARGV[b + 2] == '1' and not redis.call('SET', KEYS[2 * i + 1], tid, 'NX', 'PX', keep) then
    existing = redis.call('GET', KEYS[2 * i + 1])
  end
  if existing then
    out[i + 1] = existing
  else
    local entry = redis.call('XADD', KEYS[1], '*', 't', tid)
    redis.call('HSET', KEYS[2 * i], 'state', 1, 'request', ARGV[b + 4], 'submitted_ms', ARGV[2],
               'deadline_ms', ARGV[b + 3], 'entry', entry, 'runs', 0, 'finishes', 0,
               'owner', ARGV[b + 5])
    redis.call('PEXPIRE', KEYS[2 * i], keep)
    out[i + 1] = tid
  end
end
return out
"""

# KEYS: task, stream, dead. ARGV: group, entry, now, deliveries, max_deliveries, result_ttl,
# channel, task_id. -> {'run', request, deadline} or {why}
_BEGIN = _LUA_PRELUDE + """
local function ack() redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2]) end
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms', 'request', 'error_code', 'error_message',
                    'submitted_ms')
if not f[1] then ack(); return {'gone'} end
local state = tonumber(f[1])
if state ~= 1 and state ~= 2 then ack(); return {'done'} end
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[6])
if now >= tonumber(f[2]) then
  finish(KEYS[1], now, ttl, 6, {deadline_code}, 'the task waited past its deadline')
  ack(); redis.call('PUBLISH', ARGV[7], ARGV[8]); return {'expired'}
end
if tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  local code = tonumber(f[4] or '0') or 0
  if code == 0 then code = {internal_code} end
  local why = 'its runner stopped each time'
  if f[5] and f[5] ~= '' then why = f[5] end
  local msg = 'gave up after ' .. ARGV[5] .. ' deliveries: ' .. why
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', {dead_maxlen}, '*', 't', ARGV[8], 'deliveries', ARGV[4],
             'error', msg)
  finish(KEYS[1], now, ttl, 4, code, msg)
  ack(); redis.call('PUBLISH', ARGV[7], ARGV[8]); return {'dead'}
end
redis.call('HSET', KEYS[1], 'state', 2, 'started_ms', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
if state ~= 2 then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return {'run', f[3], f[2], f[6]}
""".replace("{deadline_code}", str(CODE_DEADLINE_EXCEEDED)).replace(
    "{internal_code}", str(CODE_INTERNAL)).replace("{dead_maxlen}", str(DEAD_LETTER_MAXLEN))

# KEYS: task, stream, result. ARGV: group, entry, now, result_ttl, state, code, message,
# response, channel, task_id. -> 1 when this call completed the task
_FINISH = _LUA_PRELUDE + """
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
local mine = 0
if state == 2 then
  local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
  finish(KEYS[1], now, ttl, tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7])
  if ARGV[5] == '3' then redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[4]) end
  redis.call('HINCRBY', KEYS[1], 'finishes', 1)
  redis.call('PUBLISH', ARGV[9], ARGV[10])
  mine = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2])
return mine
"""

# KEYS: task. ARGV: code, message, channel, task_id
_RELEASE = """
if tonumber(redis.call('HGET', KEYS[1], 'state') or '0') == 2 then
  redis.call('HSET', KEYS[1], 'state', 1, 'error_code', ARGV[1], 'error_message', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
"""

# KEYS: task, stream. ARGV: now, result_ttl, channel, task_id -> 0 when unknown
_CANCEL = _LUA_PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'state', 'entry')
if not f[1] then return 0 end
local state = tonumber(f[1])
if state == 1 or state == 2 then
  finish(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 5, {cancelled_code}, 'cancelled by the client')
  if state == 1 and f[2] then redis.call('XDEL', KEYS[2], f[2]) end
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
""".replace("{cancelled_code}", str(CODE_CANCELLED))


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue:
    """Durable tasks on a Redis stream with a consumer group."""

    durable = True

    def __init__(self, url: str, settings: QueueSettings, timeout_s: float = 5.0,
                 max_connections: int = 64):
        self.settings = settings
        self.url = url
        # Callers wait for a free connection (up to timeout_s) rather than fail: one is held
        # by each runner's blocking read and one by the events subscription.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=None,
            socket_connect_timeout=timeout_s, health_check_interval=30)
        self.redis = aioredis.Redis(connection_pool=pool)
        p = settings.key_prefix
        self.stream, self.dead, self.channel = f"{p}:queue", f"{p}:dead", f"{p}:events"
        self.watchers = Watchers()
        self._submit = self.redis.register_script(_SUBMIT)
        self._begin = self.redis.register_script(_BEGIN)
        self._finish = self.redis.register_script(_FINISH)
        self._release = self.redis.register_script(_RELEASE)
        self._cancel = self.redis.register_script(_CANCEL)
        self._listener: asyncio.Task | None = None
        self._subscribed = asyncio.Event()

    def task_key(self, task_id: str) -> str:
        return f"{self.settings.key_prefix}:task:{task_id}"

    def result_key(self, task_id: str) -> str:
        return f"{self.settings.key_prefix}:result:{task_id}"

    def idem_key(self, key: str) -> str:
        return f"{self.settings.key_prefix}:idem:{key}"

    async def start(self) -> None:
        await self._ensure_group()

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def submit(self, tasks: Sequence[NewTask]) -> list[str]:
        now = now_ms()
        keys = [self.stream]
        args: list = [self.settings.max_queue, now, len(tasks), int(self.settings.result_ttl_s * 1000)]
        for t in tasks:
            tid = new_task_id()
            keys += [self.task_key(tid), self.idem_key(t.idempotency_key or tid)]
            args += [tid, "1" if t.idempotency_key else "0",
                     deadline_ms(now, self.settings, t.timeout_s), t.request, t.owner]
        out = await self._call(self._submit, keys, args)
        if out[0] == 0:
            raise Overloaded(full_message(int(out[1]), len(tasks), self.settings.max_queue))
        return [_str(x) for x in out[1:]]

    async def get(self, task_id: str) -> TaskView:
        check_task_id(task_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.task_key(task_id), _VIEW_FIELDS)
            pipe.get(self.result_key(task_id))
            values, response = await self._run(pipe.execute())
        if values[0] is None:
            raise NotFound(f"unknown task '{task_id}' (never submitted, or forgotten after "
                           "twice its result TTL)")
        fields = {k: _str(v) for k, v in zip(_VIEW_FIELDS, values, strict=True) if v is not None}
        return view_at(task_id, fields, response, now_ms())

    async def deadline(self, task_id: str) -> int:
        value = await self._run(self.redis.hget(self.task_key(task_id), "deadline_ms"))
        return int(value or 0)

    async def cancel(self, task_id: str) -> TaskView:
        check_task_id(task_id)
        await self._call(self._cancel, [self.task_key(task_id), self.stream],
                         [now_ms(), int(self.settings.result_ttl_s * 1000), self.channel, task_id])
        return await self.get(task_id)

    async def length(self) -> int:
        return int(await self._run(self.redis.xlen(self.stream)))

    async def listen(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())
        await self._subscribed.wait()

    async def _listen(self) -> None:
        """One subscription per process; wakes local watchers. Reconnects with a backoff."""
        backoff = Backoff()
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._subscribed.set()
                    backoff.reset()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.watchers.notify(_str(message["data"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("task events subscription lost (%s); retrying in %.1fs", e,
                            backoff.delay_s)
                self._subscribed.set()  # watchers fall back to their periodic re-read
                await backoff.wait()

    # -- runner side

    async def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count,
                                                block=max(1, int(block_s * 1000)))
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis lost its data: recreate and go on
                await self._ensure_group()
                return []
            raise
        return [Delivery(_str(eid), _str(f[b"t"]), 1) for _s, entries in reply or []
                for eid, f in entries if f]

    async def claim(self, consumer: str, count: int) -> list[Delivery]:
        """Entries idle past claim_idle_s (their runner died, or released them)."""
        idle_ms = int(self.settings.claim_idle_s * 1000)
        try:
            reply = await self.redis.xautoclaim(self.stream, GROUP, consumer, idle_ms,
                                                start_id="0-0", count=count)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                await self._ensure_group()
                return []
            raise
        entries = [(eid, f) for eid, f in reply[1] if f]
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid, _f in entries:
                pipe.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
            pending = await pipe.execute()
        out = []
        for (eid, f), p in zip(entries, pending, strict=True):
            deliveries = int(p[0]["times_delivered"]) if p else self.settings.max_deliveries + 1
            out.append(Delivery(_str(eid), _str(f[b"t"]), deliveries))
        return out

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Resets the idle time of entries this runner is still running (JUSTID: the
        delivery count is not incremented), so that no other runner claims them."""
        if entry_ids:
            await self.redis.xclaim(self.stream, GROUP, consumer, 0, list(entry_ids), justid=True)

    async def begin(self, d: Delivery) -> Started | str:
        out = await self._call(
            self._begin, [self.task_key(d.task_id), self.stream, self.dead],
            [GROUP, d.entry_id, now_ms(), d.deliveries, self.settings.max_deliveries,
             int(self.settings.result_ttl_s * 1000), self.channel, d.task_id])
        if _str(out[0]) != "run":
            return _str(out[0])
        return Started(out[1], int(out[2]), int(out[3]))

    async def finish(self, d: Delivery, state: State, response: bytes, code: int,
                     message: str) -> bool:
        out = await self._call(
            self._finish, [self.task_key(d.task_id), self.stream, self.result_key(d.task_id)],
            [GROUP, d.entry_id, now_ms(), int(self.settings.result_ttl_s * 1000), int(state),
             code, message, response, self.channel, d.task_id])
        return out == 1

    async def release(self, d: Delivery, code: int, message: str) -> None:
        await self._call(self._release, [self.task_key(d.task_id)],
                         [code, message, self.channel, d.task_id])

    async def _call(self, script, keys, args):
        return await self._run(script(keys=keys, args=args))

    @staticmethod
    async def _run(awaitable):
        try:
            return await awaitable
        except (RedisError, OSError) as e:
            raise Unavailable(f"the task store (Redis) is unavailable: {e}") from e


# ------------------------------------------------------------------------ in memory


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
                raise Overloaded(
                    f"this API key holds {held} tasks (waiting, running or finished and not "
                    f"yet expired), at most {s.max_per_key}: read or wait for them to expire")

    def _keep_until(self, task_id: str, at_ms: int) -> None:
        self.tasks[task_id].fields["forget_ms"] = str(at_ms)
        heapq.heappush(self._drops, (at_ms, task_id))

    async def submit(self, tasks: Sequence[NewTask]) -> list[str]:
        now = now_ms()
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
        self._forget_old(now_ms())
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"unknown task '{task_id}' (never submitted, or forgotten after "
                           "twice its result TTL)")
        return task

    async def get(self, task_id: str) -> TaskView:
        task = self._task(task_id)
        return view_at(task_id, task.fields, task.response, now_ms())

    async def deadline(self, task_id: str) -> int:
        return int(self._task(task_id).fields["deadline_ms"])

    def _finish(self, task_id: str, state: State, code: int, message: str) -> None:
        task = self.tasks[task_id]
        now = now_ms()
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
        if now_ms() >= deadline:
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
            self._finish(d.task_id, State.FAILED, code,
                         f"gave up after {d.deliveries} deliveries: {message}")
            return
        task.fields.update(state=str(int(State.PENDING)), error_code=str(code),
                           error_message=message)
        self._seq += 1
        self._open.discard(d.entry_id)
        task.entry_id = f"{now_ms()}-{self._seq}"  # a new delivery, as a claim makes one
        self._open.add(task.entry_id)
        self._waiting.append(Delivery(task.entry_id, d.task_id, d.deliveries + 1))
        self.watchers.notify(d.task_id)
        async with self._cond():
            self._cond().notify_all()
