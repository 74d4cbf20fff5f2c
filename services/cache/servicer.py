"""meshserve.v1.Cache: translation between the protos and the PredictionCache."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from meshserve.cache.backends import Entry, Key
from meshserve.cache.core import PredictionCache
from meshserve.common import tracing
from meshserve.common.grpcutil import grpc_errors
from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Messages of one stream handled at the same time, at most (then reading waits).
MAX_IN_FLIGHT_PER_STREAM = 256


def _key(k: cache_pb2.CacheKey) -> Key:
    return Key(k.model, k.version, k.digest)


def trace_lookups(request: cache_pb2.LookupRequest, results, start_ns: int) -> None:
    """A log line (sampled requests) and a span per traced key of a lookup message."""
    end_ns = time.time_ns()
    for key, result, traceparent in zip(request.keys, results, request.traceparents,
                                        strict=False):
        ctx = tracing.parse(traceparent)
        hit = "hit" if result.hit else "miss"
        tracing.log_request(log, ctx, "cache lookup %s version %s: %s in %.2f ms", key.model,
                            key.version, hit, (end_ns - start_ns) / 1e6)
        tracing.record_span("cache lookup", ctx, start_ns, end_ns, model=key.model,
                            version=key.version, hit=result.hit)


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, cache: PredictionCache):
        self.cache = cache
        # One per open LookupStream: queues a message for it (invalidation notices).
        self._lookup_streams: set[Callable[[cache_pb2.LookupResponse], None]] = set()

    async def _lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        response = cache_pb2.LookupResponse(id=request.id)
        if request.stores:
            outcome = await self._store_entries(request.stores)
            response.stored, response.skipped, response.dropped = (
                outcome.stored, outcome.skipped, outcome.dropped)
        if request.keys:
            start_ns = time.time_ns()
            results = await self.cache.lookup([_key(k) for k in request.keys])
            if request.traceparents:
                trace_lookups(request, results, start_ns)
            response.results.extend([
                cache_pb2.LookupResult(hit=r.hit, value=r.value, generation=r.generation)
                for r in results])
        return response

    async def _store_entries(self, entries):
        return await self.cache.store([
            Entry(_key(e.key), e.value, e.generation, e.ttl_s) for e in entries])

    async def _store(self, request: cache_pb2.StoreRequest) -> cache_pb2.StoreResponse:
        outcome = await self._store_entries(request.entries)
        return cache_pb2.StoreResponse(id=request.id, stored=outcome.stored,
                                       skipped=outcome.skipped, dropped=outcome.dropped)

    @grpc_errors
    async def Lookup(self, request, context):
        return await self._lookup(request)

    @grpc_errors
    async def Store(self, request, context):
        return await self._store(request)

    @grpc_errors
    async def LookupStream(self, request_iterator, context):
        async for response in handle_concurrently(request_iterator, self._lookup,
                                                  self._lookup_streams):
            yield response

    @grpc_errors
    async def StoreStream(self, request_iterator, context):
        async for response in handle_concurrently(request_iterator, self._store):
            yield response

    @grpc_errors
    async def Invalidate(self, request, context):
        removed = await self.cache.invalidate(request.model, request.version or None)
        notice = cache_pb2.LookupResponse(invalidated=[
            cache_pb2.Invalidated(model=request.model, version=request.version)])
        for post in list(self._lookup_streams):
            post(notice)
        return cache_pb2.InvalidateResponse(removed=removed)

    @grpc_errors
    async def Stats(self, request, context):
        s = self.cache.stats()
        return cache_pb2.StatsResponse(
            backend=s.backend, hits=s.hits, misses=s.misses, errors=s.errors, stores=s.stores,
            too_large=s.too_large, entries=s.entries, bytes=s.bytes)


async def handle_concurrently(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]],
    posters: set[Callable[[Resp], None]] | None = None,
) -> AsyncIterator[Resp]:
    """Answers each message of a stream as soon as its own handler is done, so one slow
    backend call never holds back the others. A handler's error ends the stream (the
    contract has no per-message status; our client validates keys before sending).
    posters: while the stream is open it holds a function that sends a message of the
    service's own on it."""
    done: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
    running: set[asyncio.Future] = set()
    loop = asyncio.get_running_loop()

    def post(message: Resp) -> None:
        ready = loop.create_future()
        ready.set_result(message)
        done.put_nowait(ready)

    def finished(task: asyncio.Task) -> None:
        slots.release()
        done.put_nowait(task)

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(handle(request))
                running.add(task)
                task.add_done_callback(finished)
        finally:
            done.put_nowait(None)

    reader = asyncio.create_task(read())
    reading = True
    if posters is not None:
        posters.add(post)
    try:
        while reading or running:
            item = await done.get()
            if item is None:
                reading = False
                if not reader.cancelled() and reader.exception() is not None:
                    exc = reader.exception()
                    if isinstance(exc, grpc.aio.AioRpcError | asyncio.CancelledError):
                        return
                    raise exc
                continue
            running.discard(item)
            yield item.result()
    finally:
        if posters is not None:
            posters.discard(post)
        reader.cancel()
        for task in running:
            task.cancel()
