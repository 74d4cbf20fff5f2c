"""Cache backends: Redis (shared by every gateway) and an in-memory LRU (embedded default).

Both keep a generation per (model, version). An entry is stored with the generation
its result was computed under and is a hit only while that is still the current one;
Invalidate bumps it. A missing generation is created from the wall clock in
milliseconds (never 0, never reused after Redis loses its data), so a Store carrying
a generation from before a reset or a reload is skipped, never served.

No grpc here; values are opaque bytes held in a CacheRecord (codec.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meshserve.cache.codec import decode_record, encode_record
from meshserve.common.backoff import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Key:
    model: str
    version: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Result:
    hit: bool
    value: bytes
    generation: int


@dataclass(frozen=True, slots=True)
class Entry:
    key: Key
    value: bytes
    generation: int
    ttl_s: int


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    stored: int = 0
    skipped: int = 0  # written for a generation that is not the current one
    dropped: int = 0  # lost to a backend error


class BackendUnavailable(Exception):
    """The backend could not answer (down, slow, or in its reconnect backoff)."""


class Backend(Protocol):
    name: str

    async def lookup(self, keys: Sequence[Key]) -> list[Result]: ...

    async def store(self, entries: Sequence[Entry]) -> StoreOutcome: ...

    async def invalidate(self, model: str, version: str | None) -> int: ...

    async def ping(self) -> bool: ...

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held, for backends that know it (0, 0 otherwise)."""
        ...

    async def close(self) -> None: ...


def new_generation() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- in memory


@dataclass(slots=True)
class _Item:
    generation: int
    value: bytes
    expires_at: float
    size_bytes: int


class MemoryBackend:
    """An LRU bounded by entries and bytes, with a TTL per entry (expired entries are
    misses, dropped when met). `clock` (monotonic seconds) can be injected in tests."""

    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        if max_entries <= 0 or max_bytes <= 0:
            raise ValueError("max_entries and max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[Key, _Item] = OrderedDict()
        self._by_version: dict[tuple[str, str], set[Key]] = {}
        self._generations: dict[tuple[str, str], int] = {}
        self._bytes = 0

    def _generation(self, model: str, version: str) -> int:
        return self._generations.setdefault((model, version), new_generation())

    async def lookup(self, keys: Sequence[Key]) -> list[Result]:
        now = self._clock()
        results = []
        for key in keys:
            generation = self._generation(key.model, key.version)
            item = self._items.get(key)
            if item is not None and item.expires_at <= now:
                self._remove(key)
                item = None
            if item is None or item.generation != generation:
                results.append(Result(False, b"", generation))
                continue
            self._items.move_to_end(key)
            results.append(Result(True, item.value, generation))
        return results

    async def store(self, entries: Sequence[Entry]) -> StoreOutcome:
        stored = skipped = 0
        now = self._clock()
        for entry in entries:
            key = entry.key
            current = self._generations.get((key.model, key.version))
            size = len(entry.value) + len(key.digest)
            if entry.generation != current or size > self.max_bytes:
                if current is None:
                    self._generation(key.model, key.version)
                skipped += 1
                continue
            self._remove(key)
            self._items[key] = _Item(entry.generation, entry.value, now + entry.ttl_s, size)
            self._by_version.setdefault((key.model, key.version), set()).add(key)
            self._bytes += size
            stored += 1
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._items)))
        return StoreOutcome(stored=stored, skipped=skipped)

    async def invalidate(self, model: str, version: str | None) -> int:
        versions = {v for (m, v) in (*self._generations, *self._by_version) if m == model}
        if version is not None:
            versions = {version}
        removed = 0
        for v in versions:
            self._generations[(model, v)] = self._generation(model, v) + 1
            for key in list(self._by_version.get((model, v), ())):
                self._remove(key)
                removed += 1
        return removed

    def _remove(self, key: Key) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        self._bytes -= item.size_bytes
        keys = self._by_version.get((key.model, key.version))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_version[(key.model, key.version)]

    async def ping(self) -> bool:
        return True

    def usage(self) -> tuple[int, int]:
        return len(self._items), self._bytes

    async def close(self) -> None:
        self._items.clear()
        self._by_version.clear()
        self._bytes = 0


# ---------------------------------------------------------------- redis

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_SCAN_COUNT = 1000


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class RedisBackend:
    """Redis via redis.asyncio (hiredis parser when installed) and a blocking pool.

    Supported URLs: redis://, rediss:// (TLS) and unix:// (what redis-py's from_url
    takes) on a standalone server or a primary behind a proxy; Sentinel and Cluster are
    not wired (keys carry a {model/version} hash tag, so one version's keys share a
    Cluster slot). Keys: `<prefix>:{<model>/<version>}:gen` holds the generation,
    `<prefix>:{<model>/<version>}:e:<hex digest>` a serialized CacheRecord.

    Every call is bounded by `timeout_s`. After a connection failure the backend
    answers BackendUnavailable at once (no call to Redis) while a background task
    PINGs with a backoff growing from `backoff_initial_s` to `backoff_max_s`."""

    name = "redis"

    def __init__(self, url: str, key_prefix: str = "meshserve", timeout_s: float = 0.05,
                 pool_size: int = 32, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 5.0):
        if timeout_s <= 0 or pool_size <= 0:
            raise ValueError("timeout_s and pool_size must be positive")
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        )
        # No client-side retries: a failed call is a miss now, and the backoff below
        # keeps a dead Redis from being hammered.
        self._redis = aioredis.Redis(connection_pool=self._pool, retry=None)
        self._up = True
        self._reconnect_task: asyncio.Task | None = None
        self.failures = 0

    @property
    def up(self) -> bool:
        return self._up

    # keys
    def _tag(self, model: str, version: str) -> str:
        return f"{self.prefix}:{{{model}/{version}}}"

    def gen_key(self, model: str, version: str) -> str:
        return self._tag(model, version) + ":gen"

    def entry_key(self, key: Key) -> str:
        return f"{self._tag(key.model, key.version)}:e:{key.digest.hex()}"

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        if not self._up:
            raise BackendUnavailable("redis is down; reconnecting")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await op()
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
            raise BackendUnavailable(f"redis: {exc or type(exc).__name__}") from exc
        except RedisError as exc:
            self.failures += 1
            raise BackendUnavailable(f"redis: {exc}") from exc

    def _mark_down(self, exc: BaseException) -> None:
        self.failures += 1
        if not self._up:
            return
        self._up = False
        log.warning("redis unavailable (%s); answering misses and reconnecting",
                    exc or type(exc).__name__)
        self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        self._backoff.reset()
        while True:
            await self._backoff.wait()
            if await self.ping():
                self._up = True
                log.info("redis is back")
                return

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self.timeout_s, 0.5)):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def _generations(self, versions: list[tuple[str, str]],
                           raw: Sequence[bytes | None]) -> dict[tuple[str, str], int]:
        """Current generations; creates the missing ones (a second round trip, only on
        the first use of a version or after Redis lost its data)."""
        found = {v: int(g) for v, g in zip(versions, raw, strict=True) if g is not None}
        missing = [v for v in versions if v not in found]
        if missing:
            pipe = self._redis.pipeline(transaction=False)
            for model, version in missing:
                pipe.set(self.gen_key(model, version), new_generation(), nx=True)
                pipe.get(self.gen_key(model, version))
            replies = await self._call(pipe.execute)
            for v, g in zip(missing, replies[1::2], strict=True):
                found[v] = int(g)
        return found

    async def lookup(self, keys: Sequence[Key]) -> list[Result]:
        versions = list(dict.fromkeys((k.model, k.version) for k in keys))
        names = [self.gen_key(m, v) for m, v in versions] + [self.entry_key(k) for k in keys]
        values = await self._call(lambda: self._redis.mget(names))
        generations = await self._generations(versions, values[: len(versions)])
        results = []
        for key, raw in zip(keys, values[len(versions):], strict=True):
            generation = generations[(key.model, key.version)]
            record = decode_record(raw) if raw is not None else None
            if record is not None and record[0] == generation:
                results.append(Result(True, record[1], generation))
            else:
                results.append(Result(False, b"", generation))
        return results

    async def store(self, entries: Sequence[Entry]) -> StoreOutcome:
        if not entries:
            return StoreOutcome()
        versions = list(dict.fromkeys((e.key.model, e.key.version) for e in entries))
        names = [self.gen_key(m, v) for m, v in versions]
        raw = await self._call(lambda: self._redis.mget(names))
        current = {v: int(g) for v, g in zip(versions, raw, strict=True) if g is not None}
        pipe = self._redis.pipeline(transaction=False)
        skipped = 0
        for entry in entries:
            if current.get((entry.key.model, entry.key.version)) != entry.generation:
                skipped += 1
                continue
            pipe.set(self.entry_key(entry.key), encode_record(entry.generation, entry.value),
                     ex=entry.ttl_s)
        stored = len(entries) - skipped
        if stored:
            try:
                await self._call(pipe.execute)
            except BackendUnavailable:
                return StoreOutcome(stored=0, skipped=skipped, dropped=stored)
        return StoreOutcome(stored=stored, skipped=skipped)

    async def invalidate(self, model: str, version: str | None) -> int:
        """Bumps the generation(s) first (from then on old entries are misses and old
        stores are skipped), then UNLINKs the entries in SCAN batches."""
        if version is None:
            base = _glob_escape(f"{self.prefix}:{{{model}/")
            gen_keys = await self._scan(base + "*}:gen")
            entries_pattern = base + "*}:e:*"
        else:
            gen_keys = [self.gen_key(model, version)]
            entries_pattern = _glob_escape(self._tag(model, version) + ":e:") + "*"
        if gen_keys:
            pipe = self._redis.pipeline(transaction=False)
            for name in gen_keys:
                pipe.set(name, new_generation(), nx=True)
                pipe.incr(name)
            await self._call(pipe.execute)
        removed = 0
        cursor = 0
        while True:
            cursor, names = await self._call(
                lambda c=cursor: self._redis.scan(c, match=entries_pattern, count=_SCAN_COUNT))
            if names:
                removed += await self._call(lambda n=names: self._redis.unlink(*n))
            if cursor == 0:
                return removed

    async def _scan(self, pattern: str) -> list[bytes]:
        found: list[bytes] = []
        cursor = 0
        while True:
            cursor, names = await self._call(
                lambda c=cursor: self._redis.scan(c, match=pattern, count=_SCAN_COUNT))
            found.extend(names)
            if cursor == 0:
                return found

    def usage(self) -> tuple[int, int]:
        return 0, 0

    async def close(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        await self._redis.aclose()
        await self._pool.disconnect()
