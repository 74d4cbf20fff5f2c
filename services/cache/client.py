"""The gateway's client of the cache service.

One LookupStream per cache address (keys sharded over addresses by digest), shared by
every coroutine: whatever is pending when the stream is free (lookups and stores alike)
goes out as one message, and answers are routed back by message id and position. The
cache is optional, so lookup() never raises (a timeout, a broken stream or an unreachable
service give misses with generation 0) and store() is fire-and-forget; the stream
reconnects in the background.

Arguments and results are the generated messages: meshserve.v1.CacheKey,
LookupResult, StoreEntry (see protos/meshserve/v1/cache.proto).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from meshserve.cache.keys import DIGEST_BYTES
from meshserve.common import tracing
from meshserve.common.backoff import Backoff
from meshserve.common.errors import Unavailable
from meshserve.common.grpcutil import channel, error_from_rpc, split_targets
from meshserve.common.hops import HopCount
from meshserve.common.transport import Transport
from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

MAX_KEYS_PER_MESSAGE = 4096
MAX_PENDING_STORE_ENTRIES = 16384
# Messages of one stream sent and not yet answered before the next waits: what arrives
# meanwhile goes out together in that next message (flow control).
MAX_UNANSWERED_MESSAGES = 1
MISS = cache_pb2.LookupResult(hit=False, generation=0)


@dataclass(slots=True)
class ClientCounters:
    lookups: int = 0  # keys asked for
    lookup_messages: int = 0  # LookupRequest messages sent
    hits: int = 0
    failed_keys: int = 0  # answered as misses: timeout, stream down, invalid key
    store_entries_sent: int = 0
    store_entries_dropped: int = 0  # stream down, queue full, or lost with the stream
    stored: int = 0
    skipped: int = 0


def _valid(key: cache_pb2.CacheKey) -> bool:
    return bool(key.model) and bool(key.version) and len(key.digest) == DIGEST_BYTES


class _Link:
    """One long-lived bidi stream, reopened with backoff. Items submitted while it is up
    are coalesced into one message whenever the writer is free: each message is answered,
    and the next waits while MAX_UNANSWERED_MESSAGES are unanswered."""

    def __init__(self, name: str, open_call: Callable[[], grpc.aio.StreamStreamCall],
                 send: Callable[[list, int], object], receive: Callable[[object], None],
                 lost: Callable[[list], None], size: Callable[[object], int],
                 sent: HopCount, answered: HopCount, answer_size: Callable[[object], int]):
        self.name = name
        self.sent, self.answered = sent, answered  # keys or entries out; answers back
        self._answer_size = answer_size
        self._open_call = open_call
        self._send = send  # (items, id) -> request message; registers what is in flight
        self._receive = receive
        self._lost = lost  # items that will never be answered
        self._size = size
        self._pending: list = []
        self._pending_size = 0  # keys or entries in _pending
        self._wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._unanswered = 0
        self.up = False
        self.state_changed: Callable[[], None] = lambda: None  # up went True or False
        self.backoff = Backoff(0.05, 2.0)  # between reopenings; reset once one is answered

    def submit(self, item) -> bool:
        if not self.up:
            return False
        self._pending.append(item)
        self._pending_size += self._size(item)
        self._wakeup.set()
        return True

    def pending_size(self) -> int:
        return self._pending_size

    async def run(self) -> None:
        while True:
            call = self._open_call()
            self._unanswered = 0
            self.up = True
            self.state_changed()
            writer = asyncio.create_task(self._write(call))
            reader = asyncio.create_task(self._read(call))
            try:
                done, _ = await asyncio.wait({writer, reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                answered = reader in done and not reader.exception() and reader.result()
            finally:
                self.up = False
                self.state_changed()
                writer.cancel()
                reader.cancel()
                call.cancel()
                pending, self._pending, self._pending_size = self._pending, [], 0
                self._lost(pending)
            if answered:
                self.backoff.reset()
            log.info("cache %s stream lost; reopening in %.2fs", self.name, self.backoff.delay_s)
            await self.backoff.wait()

    async def _write(self, call) -> None:
        while True:
            while not self._pending or self._unanswered >= MAX_UNANSWERED_MESSAGES:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._pending_size <= MAX_KEYS_PER_MESSAGE:
                batch, total, self._pending, self._pending_size = (
                    self._pending, self._pending_size, [], 0)
            else:
                batch, total = [], 0
                while self._pending and (not batch or total < MAX_KEYS_PER_MESSAGE):
                    item = self._pending.pop(0)
                    batch.append(item)
                    total += self._size(item)
                self._pending_size -= total
            self._unanswered += 1
            self.sent.add(total)
            # _send registers the batch as in flight: if the write fails, run() reports
            # it lost with the rest.
            await call.write(self._send(batch, next(self._ids)))

    async def _read(self, call) -> bool:
        """Returns whether anything was answered before the stream ended."""
        answered = False
        try:
            async for response in call:
                answered = True
                if self._receive(response):  # an answer (not a message of the service's own)
                    self.answered.add(self._answer_size(response))
                    self._unanswered = max(0, self._unanswered - 1)
                    self._wakeup.set()
        except grpc.aio.AioRpcError as exc:
            log.debug("cache %s stream ended: %s", self.name, exc.code())
        return answered


class _Shard:
    """The stream to one cache address: one LookupStream, whose messages carry both the
    keys to look up and the entries to store (items: (keys, future, traceparent) for a
    lookup, (entries, None, "") for a store)."""

    def __init__(self, target: str, counters: ClientCounters, hops: dict[str, HopCount],
                 transport: Transport | None = None):
        self.target = target
        self.counters = counters
        self.channel = channel(target, transport)
        self.stub = cache_pb2_grpc.CacheStub(self.channel)
        # id -> [(future, number of keys)] in message order
        self._lookups_in_flight: dict[int, list[tuple[asyncio.Future, int]]] = {}
        # (model, version or "") for each invalidation the service announces
        self.invalidated: Callable[[str, str], None] = lambda model, version: None
        self._stores_in_flight: dict[int, int] = {}
        self.lookup_link = _Link(
            "lookup", lambda: self.stub.LookupStream(), self._lookup_message,
            self._lookup_answered, self._lookups_lost, size=lambda item: len(item[0]),
            sent=hops["gateway->cache"], answered=hops["cache->gateway"],
            answer_size=lambda response: len(response.results))

    def _lookup_message(self, batch: list, message_id: int) -> cache_pb2.LookupRequest:
        lookups = [item for item in batch if item[1] is not None]
        request = cache_pb2.LookupRequest(id=message_id)
        if lookups:
            self._lookups_in_flight[message_id] = [(future, len(keys))
                                                   for keys, future, _ in lookups]
            self.counters.lookup_messages += 1
            for keys, _, _ in lookups:
                request.keys.extend(keys)
            if any(traceparent for _, _, traceparent in lookups):
                for keys, _, traceparent in lookups:
                    request.traceparents.extend([traceparent] * len(keys))
        if len(lookups) < len(batch):
            for entries, future, _ in batch:
                if future is None:
                    request.stores.extend(entries)
            self._stores_in_flight[message_id] = len(request.stores)
            self.counters.store_entries_sent += len(request.stores)
        return request

    def _lookup_answered(self, response: cache_pb2.LookupResponse) -> bool:
        for notice in response.invalidated:
            self.invalidated(notice.model, notice.version)
        if not response.id:
            return False
        if self._stores_in_flight.pop(response.id, None) is not None:
            self.counters.stored += response.stored
            self.counters.skipped += response.skipped
            self.counters.store_entries_dropped += response.dropped
        waiting = self._lookups_in_flight.pop(response.id, None)
        if waiting is None:
            return True
        results = list(response.results)
        if len(results) != sum(n for _, n in waiting):
            log.warning("cache answered %d results for %d keys; ignoring", len(results),
                        sum(n for _, n in waiting))
            results = []
        offset = 0
        for future, n in waiting:
            if not future.done():
                if results:
                    future.set_result(results[offset:offset + n])
                else:
                    future.set_exception(Unavailable("bad cache answer"))
                    future.exception()
            offset += n
        return True

    def _lookups_lost(self, batch: list) -> None:
        waiting = [future for _, future, _ in batch if future is not None]
        for entries in self._lookups_in_flight.values():
            waiting.extend(future for future, _ in entries)
        self._lookups_in_flight.clear()
        lost = sum(len(entries) for entries, future, _ in batch if future is None)
        self.counters.store_entries_dropped += lost + sum(self._stores_in_flight.values())
        self._stores_in_flight.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(Unavailable("cache stream lost"))
                future.exception()  # retrieved: a caller that timed out is gone


class CacheClient:
    """lookup() and store() coalesced over one LookupStream per address.

    target: one address, a gRPC URI (dns:///name:port: one channel, round_robin), or a
    comma list of addresses: then keys are sharded over them by digest, so a key's
    lookups and stores (and its generation) always meet the same cache replica."""

    def __init__(self, target: str, timeout_s: float = 0.05, admin_timeout_s: float = 10.0,
                 transport: Transport | None = None):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.target = target
        self.targets = split_targets(target)
        if not self.targets:
            raise ValueError("the cache target is empty")
        self.timeout_s = timeout_s
        self.admin_timeout_s = admin_timeout_s
        self.transport = transport
        self.counters = ClientCounters()
        # keys and entries out, results back
        self.hops = {hop: HopCount() for hop in ("gateway->cache", "cache->gateway")}
        self._shards: list[_Shard] = []  # (none until start: every lookup a miss)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        # What an in-process L1 in front of this client needs to stay exact: every
        # invalidation the services announce, and whether every lookup stream is up (while
        # one is down, announcements can be missed).
        self.on_invalidated: Callable[[str, str], None] = lambda model, version: None
        self.on_availability: Callable[[bool], None] = lambda up: None

    async def start(self) -> None:
        # Kept: asyncio.get_running_loop() makes a getpid() system call on Python 3.11
        # (2-3% of the gateway's CPU when called per request).
        self._loop = asyncio.get_running_loop()
        self._shards = [_Shard(t, self.counters, self.hops, self.transport)
                        for t in self.targets]
        for shard in self._shards:
            shard.invalidated = lambda model, version: self.on_invalidated(model, version)
            shard.lookup_link.state_changed = self._availability_changed
        self._tasks = [asyncio.create_task(link.run()) for shard in self._shards
                       for link in (shard.lookup_link,)]
        await asyncio.sleep(0)  # let the streams open

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.on_availability(False)
        for shard in self._shards:
            await shard.channel.close()
        self._shards = []

    def _shard(self, key: cache_pb2.CacheKey) -> _Shard | None:
        if not self._shards:
            return None
        return self._shards[int.from_bytes(key.digest[:8], "big") % len(self._shards)]

    def hop_counts(self) -> list[tuple[str, HopCount]]:
        return list(self.hops.items())

    def available(self) -> bool:
        """Every lookup stream is up."""
        return bool(self._shards) and all(s.lookup_link.up for s in self._shards)

    def _availability_changed(self) -> None:
        self.on_availability(self.available())

    # lookups
    async def lookup(self, keys: Sequence[cache_pb2.CacheKey]) -> list[cache_pb2.LookupResult]:
        """One LookupResult per key, in order. Never raises (except on cancellation)."""
        keys = list(keys)
        self.counters.lookups += len(keys)
        valid = [i for i, k in enumerate(keys) if _valid(k)]
        results = [MISS] * len(keys)
        self.counters.failed_keys += len(keys) - len(valid)
        if not valid:
            return results
        by_shard: dict[int, list[int]] = {}
        for i in valid:
            shard = self._shard(keys[i])
            by_shard.setdefault(id(shard), []).append(i)
        answers = await asyncio.gather(*(
            self._lookup_on(self._shard(keys[positions[0]]), [keys[i] for i in positions])
            for positions in by_shard.values()))
        for positions, answered in zip(by_shard.values(), answers, strict=True):
            for i, result in zip(positions, answered, strict=True):
                results[i] = result
        return results

    async def lookup_one(self, key: cache_pb2.CacheKey) -> cache_pb2.LookupResult:
        """lookup([key])[0] at the cost of one future (the gateway's path). Never raises
        (except on cancellation)."""
        self.counters.lookups += 1
        shard = self._shard(key) if _valid(key) else None
        if shard is None:
            self.counters.failed_keys += 1
            return MISS
        loop = self._loop
        future = loop.create_future()
        # The caller's trace context (tracing.current) goes with its key.
        if not shard.lookup_link.submit(
                ([key], future, tracing.current_traceparent())):
            self.counters.failed_keys += 1
            return MISS
        timer = loop.call_later(self.timeout_s, _time_out, future)
        try:
            [result] = await future
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a timeout or a lost stream is a miss
            self.counters.failed_keys += 1
            return MISS
        finally:
            timer.cancel()
        self.counters.hits += result.hit
        return result

    async def _lookup_on(self, shard: _Shard | None, keys: list[cache_pb2.CacheKey]
                         ) -> list[cache_pb2.LookupResult]:
        misses = [MISS] * len(keys)
        future = asyncio.get_running_loop().create_future()
        # The caller's trace context (tracing.current) goes with its keys.
        item = (keys, future, tracing.current_traceparent())
        if shard is None or not shard.lookup_link.submit(item):
            self.counters.failed_keys += len(keys)
            return misses
        try:
            answered = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a timeout or a lost stream is a miss
            self.counters.failed_keys += len(keys)
            return misses
        self.counters.hits += sum(r.hit for r in answered)
        return list(answered)

    # stores
    def store(self, entries: Sequence[cache_pb2.StoreEntry]) -> None:
        """Queues entries for the next lookup message; dropped (counted) when the stream
        is down."""
        entries = [e for e in entries if _valid(e.key)]
        by_shard: dict[int, tuple[_Shard | None, list]] = {}
        for e in entries:
            shard = self._shard(e.key)
            by_shard.setdefault(id(shard), (shard, []))[1].append(e)
        for shard, group in by_shard.values():
            link = shard.lookup_link if shard is not None else None
            if (link is None
                    or link.pending_size() + len(group) > MAX_PENDING_STORE_ENTRIES
                    or not link.submit((group, None, ""))):
                self.counters.store_entries_dropped += len(group)

    def store_one(self, entry: cache_pb2.StoreEntry) -> None:
        """store([entry]) without the grouping (the gateway's path)."""
        if not _valid(entry.key):
            return
        shard = self._shard(entry.key)
        link = shard.lookup_link if shard is not None else None
        if (link is None or link.pending_size() >= MAX_PENDING_STORE_ENTRIES
                or not link.submit(([entry], None, ""))):
            self.counters.store_entries_dropped += 1

    # admin (unary)
    async def invalidate(self, model: str, version: str | None = None) -> int:
        """Entries removed (over every address). Raises Unavailable (or InvalidInput) when
        it could not be done."""
        request = cache_pb2.InvalidateRequest(model=model, version=version or "")
        if not self._shards:
            raise Unavailable("CacheClient is not started")
        answers = await asyncio.gather(*(self._unary(s, s.stub.Invalidate, request)
                                         for s in self._shards))
        return sum(a.removed for a in answers)

    async def stats(self) -> cache_pb2.StatsResponse:
        """The statistics of the first address."""
        if not self._shards:
            raise Unavailable("CacheClient is not started")
        shard = self._shards[0]
        return await self._unary(shard, shard.stub.Stats, cache_pb2.StatsRequest())

    async def _unary(self, shard: _Shard, method, request):
        try:
            return await method(request, timeout=self.admin_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"cache at {shard.target}") from None


def _time_out(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
        future.exception()  # retrieved: the caller may be gone
