"""State shared by every replica of the mesh, one record per model: a Redis hash with a
pub/sub channel when the mesh has Redis, else a board held by the batcher and watched over
one long-lived gRPC stream. Routing policies (gateway.routing_store) and model control
(common.model_control) are kept this way.

- Redis: the record (serialized protobuf) in one hash field per model, and a message on the
  channel naming the model after each change; a watcher subscribes first, then reads the
  whole hash (so no change falls between the two), then re-reads each changed field. After
  a reconnect it reads the whole hash again: a replica that starts late or missed changes
  catches up.
- Board (no Redis): the batcher keeps the latest change per model in memory and streams a
  snapshot, then every change, to each watcher. Change messages have the fields `model`,
  `deleted` and `snapshot_done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from meshserve.common.backoff import Backoff
from meshserve.common.logs import clip

log = logging.getLogger(__name__)

T = TypeVar("T")


class Synced(Generic[T]):
    """Applies a full snapshot (removing models that vanished) or one change."""

    def __init__(self, apply: Callable[[str, T | None], None]):
        self.apply = apply
        self.known: set[str] = set()
        self.ready = asyncio.Event()

    def snapshot(self, entries: dict[str, T | None]) -> None:
        for model in self.known - set(entries):
            self.apply(model, None)
        self.known = {m for m, v in entries.items() if v is not None}
        for model, value in entries.items():
            self.apply(model, value)
        self.ready.set()

    def change(self, model: str, value: T | None) -> None:
        (self.known.add if value is not None else self.known.discard)(model)
        self.apply(model, value)


async def watch_redis(redis, key: str, channel: str, synced: Synced,
                      parse: Callable[[bytes], object], what: str) -> None:
    """Keeps `synced` up to date with a Redis hash of serialized records, forever
    (reconnects with a backoff). parse(bytes) -> a record's value."""
    backoff = Backoff(max_s=2.0)

    def decode(model: str, data: bytes | None):
        if data is None:
            return None
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - a corrupt record is skipped, never fatal
            log.warning("stored %s of %s is unreadable: %s", what, model, e)
            return None

    while True:
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                # Subscribed first, then read: no change can fall between the two.
                entries = await redis.hgetall(key)
                synced.snapshot({k.decode(): decode(k.decode(), v) for k, v in entries.items()})
                backoff.reset()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    model = message["data"].decode(errors="replace")
                    synced.change(model, decode(model, await redis.hget(key, model)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reconnect with a backoff
            log.warning("%s: Redis watch failed (%s); retrying", what, e)
            await backoff.wait()


async def put_redis(redis, key: str, channel: str, model: str, data: bytes | None) -> None:
    """Stores (data None: removes) one model's record and tells every watcher."""
    async with redis.pipeline(transaction=True) as pipe:
        if data is None:
            pipe.hdel(key, model)
        else:
            pipe.hset(key, model, data)
        pipe.publish(channel, model)
        await pipe.execute()


async def watch_stream(open_watch: Callable[[], AsyncIterator], synced: Synced,
                       decode: Callable[[object], object], what: str) -> None:
    """Keeps `synced` up to date with a board's Watch stream, forever (reopens it with a
    backoff). decode(change) -> the value of a change that is not `deleted`."""
    backoff = Backoff(max_s=2.0)
    while True:
        try:
            entries: dict = {}
            in_snapshot = True
            async for change in open_watch():
                if in_snapshot:
                    if change.snapshot_done:
                        synced.snapshot(entries)
                        in_snapshot = False
                        backoff.reset()
                    else:
                        entries[change.model] = decode(change)
                    continue
                synced.change(change.model, None if change.deleted else decode(change))
            raise ConnectionError("the store closed the watch")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reconnect with a backoff
            log.info("%s: batcher watch ended (%s); retrying", what, e)
            await backoff.wait()


class Board:
    """model -> its latest change message; each watcher gets every change on its own queue,
    each listener (a callback in the batcher itself) is called with it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.entries: dict[str, object] = {}
        self.listeners: list[Callable[[object], None]] = []
        self._watchers: set[asyncio.Queue] = set()

    def put(self, change):
        if change.deleted:
            self.entries.pop(change.model, None)
        else:
            self.entries[change.model] = change
        log.info("%s of %s %s", self.what, clip(change.model),
                 "removed" if change.deleted else "set")
        for q in list(self._watchers):
            q.put_nowait(change)
        for listener in self.listeners:
            listener(change)
        return change

    async def watch(self, model: str, done) -> AsyncIterator:
        """Every stored change now (of `model`, or all for ""), then `done`, then every
        change, until the caller stops."""
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        try:
            for change in list(self.entries.values()):
                if not model or change.model == model:
                    yield change
            yield done
            while True:
                change = await q.get()
                if not model or change.model == model:
                    yield change
        finally:
            self._watchers.discard(q)


async def start_watch(watch, synced: Synced, wait_s: float, what: str, where: str
                      ) -> asyncio.Task:
    """Starts the watch task and waits (bounded by wait_s) for its first snapshot."""
    task = asyncio.get_running_loop().create_task(watch)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(synced.ready.wait()), wait_s)
    if not synced.ready.is_set():
        log.warning("%s: %s not answering yet; watching on", what, where)
    return task


async def stop(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
