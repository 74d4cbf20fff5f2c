"""The cache service: gRPC server, health, metrics, backend lifecycle."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry

from meshserve.cache.backends import Backend, MemoryBackend, RedisBackend
from meshserve.cache.config import Settings
from meshserve.cache.core import PredictionCache
from meshserve.cache.servicer import CacheServicer
from meshserve.common import metrics, tracing
from meshserve.common.backoff import Backoff
from meshserve.common.grpcutil import new_server, set_serving, wait_for_signal
from meshserve.common.settings import write_port_file
from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name


def make_backend(settings: Settings) -> Backend:
    if settings.redis_url:
        return RedisBackend(settings.redis_url, settings.key_prefix,
                            timeout_s=settings.redis_timeout_ms / 1000,
                            pool_size=settings.redis_pool_size)
    return MemoryBackend(settings.memory_max_entries, settings.memory_max_bytes)


async def create_server(
    settings: Settings, backend: Backend | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[grpc.aio.Server, int, object, PredictionCache]:
    """A started server (NOT_SERVING until serve() or the caller says so).
    Returns (server, bound port, health servicer, cache)."""
    registry = registry or CollectorRegistry()
    cache = PredictionCache(backend or make_backend(settings), registry,
                            default_ttl_s=settings.default_ttl_s,
                            max_entry_bytes=settings.max_entry_bytes)
    server, port, health = new_server(f"{settings.host}:{settings.port}", [SERVICE_NAME],
                                      transport=settings.transport)
    cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(cache), server)
    await server.start()
    return server, port, health, cache


async def wait_backend_ready(cache: PredictionCache, max_backoff_s: float = 5.0) -> None:
    """Returns once the backend answered a PING (at once for the in-memory one)."""
    backoff = Backoff(max_s=max_backoff_s)
    while not await cache.ready():
        log.warning("cache backend %s not answering; retrying in %.1fs",
                    cache.backend.name, backoff.delay_s)
        await backoff.wait()


async def serve(settings: Settings) -> None:
    tracing.setup("meshserve-cache", settings.transport.otlp_endpoint)
    registry = CollectorRegistry()
    server, port, health, cache = await create_server(settings, registry=registry)
    metrics_port = metrics.serve(registry, settings.metrics_port, addr=settings.host)
    log.info("cache (%s backend) listening on %s:%d", cache.backend.name, settings.host, port)
    try:
        await wait_backend_ready(cache)
        # SERVING from the first answer on, and kept while the backend is down: a cache
        # outage only turns lookups into misses, it never fails an inference.
        await set_serving(health, [SERVICE_NAME], True)
        write_port_file(settings.port_file, grpc=port, metrics=metrics_port)
        await wait_for_signal()
    finally:
        await set_serving(health, [SERVICE_NAME], False)
        await server.stop(settings.grace_s)
        await cache.close()
