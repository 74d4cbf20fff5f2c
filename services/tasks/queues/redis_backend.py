"""The durable task queue on Redis Streams.

Redis layout (prefix P, default "meshserve:tasks"):
  P:queue          stream of task ids (and owners); consumer group "runners". An entry is removed (XACK +
                   XDEL) once its task is done, so XLEN is the tasks waiting or running.
  P:task:<id>      hash: state, request (serialized protobuf, dropped when done), times,
                   error, owner (the submitting key's hash), runs (starts), finishes
                   (completions: 1 at most). TTL.
  P:result:<id>    the serialized ModelInferResponse, TTL result_ttl_s.
  P:idem:<key>     idempotency key -> task id (SET NX), as long-lived as the task.
  P:held:<owner>   sorted set: the ids of the tasks an API key holds, scored by when each is
                   forgotten (the key's quota, max_per_key: RESOURCE_EXHAUSTED past it).
  P:dead           dead-letter stream: tasks given up after max_deliveries.
  P:events         pub/sub channel: the id of every task whose state changed (for Watch).

Every transition is one Lua script (lua/*.lua, loaded at import), so it is atomic: a task
completes at most once even when a slow runner's entry was claimed by another (execution
is at least once, completion exactly once). For Redis Cluster, put a hash tag in the
prefix ("{tasks}") so that every key of a script lives in one slot. No grpc and no pickle
here; payloads are opaque bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from meshserve.common.backoff import Backoff
from meshserve.common.errors import NotFound, Overloaded, Unavailable
from meshserve.tasks.queues.contract import (
    DEAD_LETTER_MAXLEN,
    GROUP,
    DeadLetter,
    Watchers,
    full_message,
    quota_message,
)
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

_VIEW_FIELDS = ("state", "submitted_ms", "deadline_ms", "finished_ms", "expires_ms",
                "error_code", "error_message", "owner")
_LUA = Path(__file__).parent / "lua"


def _script(name: str, prelude: bool = True) -> str:
    """lua/<name>.lua, after lua/prelude.lua (its helpers) unless prelude is False."""
    body = (_LUA / f"{name}.lua").read_text()
    return (_LUA / "prelude.lua").read_text() + body if prelude else body


_SUBMIT, _BEGIN, _FINISH, _CANCEL = (_script(n) for n in ("submit", "begin", "finish", "cancel"))
_RELEASE = _script("release", prelude=False)


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue:
    """Durable tasks on a Redis stream with a consumer group."""

    durable = True

    def __init__(self, url: str, settings: QueueSettings, timeout_s: float = 5.0,
                 max_connections: int = 64, clock: Callable[[], int] = now_ms):
        """clock: the wall clock in ms (tasks' deadlines and TTLs; Redis expires keys by its
        own clock)."""
        self.settings = settings
        self.clock = clock
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

    def held_key(self, owner: str) -> str:
        return f"{self.settings.key_prefix}:held:{owner}"

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
        now = self.clock()
        keys = [self.stream]
        s = self.settings
        args: list = [s.max_queue, now, len(tasks), int(s.result_ttl_s * 1000), s.max_per_key]
        for t in tasks:
            tid = new_task_id()
            keys += [self.task_key(tid), self.idem_key(t.idempotency_key or tid),
                     self.held_key(t.owner)]
            args += [tid, "1" if t.idempotency_key else "0",
                     deadline_ms(now, s, t.timeout_s), t.request, t.owner]
        out = await self._call(self._submit, keys, args)
        if out[0] == 0:
            raise Overloaded(full_message(int(out[1]), len(tasks), s.max_queue))
        if out[0] == 2:
            raise Overloaded(quota_message(int(out[1]), s.max_per_key))
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
        return view_at(task_id, fields, response, self.clock())

    async def deadline(self, task_id: str) -> int:
        value = await self._run(self.redis.hget(self.task_key(task_id), "deadline_ms"))
        return int(value or 0)

    async def cancel(self, task_id: str) -> TaskView:
        check_task_id(task_id)
        owner = await self._run(self.redis.hget(self.task_key(task_id), "owner"))
        await self._call(self._cancel, [self.task_key(task_id), self.stream,
                                        self.held_key(_str(owner or ""))],
                         [self.clock(), int(self.settings.result_ttl_s * 1000), self.channel, task_id,
                          CODE_CANCELLED])
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

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        entries = await self._run(self.redis.xrange(self.dead, count=count))
        return [DeadLetter(_str(f[b"t"]), int(f[b"deliveries"]), _str(f[b"error"]))
                for _id, f in entries]

    async def read(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count,
                                                block=max(1, int(block_s * 1000)))
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis lost its data: recreate and go on
                await self._ensure_group()
                return []
            raise
        return [Delivery(_str(eid), _str(f[b"t"]), 1, _str(f.get(b"o", b"")))
                for _s, entries in reply or [] for eid, f in entries if f]

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
            out.append(Delivery(_str(eid), _str(f[b"t"]), deliveries, _str(f.get(b"o", b""))))
        return out

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Resets the idle time of entries this runner is still running (JUSTID: the
        delivery count is not incremented), so that no other runner claims them."""
        if entry_ids:
            await self.redis.xclaim(self.stream, GROUP, consumer, 0, list(entry_ids), justid=True)

    async def begin(self, d: Delivery) -> Started | str:
        out = await self._call(
            self._begin, [self.task_key(d.task_id), self.stream, self.dead,
                          self.held_key(d.owner)],
            [GROUP, d.entry_id, self.clock(), d.deliveries, self.settings.max_deliveries,
             int(self.settings.result_ttl_s * 1000), self.channel, d.task_id,
             CODE_DEADLINE_EXCEEDED, CODE_INTERNAL, DEAD_LETTER_MAXLEN])
        if _str(out[0]) != "run":
            return _str(out[0])
        return Started(out[1], int(out[2]), int(out[3]))

    async def finish(self, d: Delivery, state: State, response: bytes, code: int,
                     message: str) -> bool:
        out = await self._call(
            self._finish, [self.task_key(d.task_id), self.stream, self.result_key(d.task_id),
                           self.held_key(d.owner)],
            [GROUP, d.entry_id, self.clock(), int(self.settings.result_ttl_s * 1000), int(state),
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


