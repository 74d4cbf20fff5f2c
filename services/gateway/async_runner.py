"""`meshserve async-runner` (python -m meshserve.tasks): async task runners beside the
gateways, running each task through the gateway's path (routing, cache, batcher) in this
process; grpc.health.v1 and metrics, no public API. The tasks package supplies the queue
and runners (tasks.server.AsyncService); this module composes them with a Gateway."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from meshserve.batcher.client import BatcherClient
from meshserve.cache.client import CacheClient
from meshserve.common import grpcutil, metrics, tracing
from meshserve.common.control_store import RedisControlStore
from meshserve.common.logs import redact_url
from meshserve.common.repository import ModelRepository
from meshserve.common.settings import write_port_file
from meshserve.gateway.core import Gateway
from meshserve.gateway.tasks_path import GatewayPath
from meshserve.tasks.config import Settings
from meshserve.tasks.server import AsyncService

log = logging.getLogger(__name__)


async def create_server(settings: Settings, registry: CollectorRegistry | None = None):
    """Returns (server, port, health, service): health only on the gRPC port."""
    registry = registry or CollectorRegistry()
    transport = settings.transport
    batcher = BatcherClient(settings.batcher, transport=transport)
    cache = (CacheClient(settings.cache, settings.cache_timeout_ms / 1000, transport=transport)
             if settings.cache else None)
    # Default versions set by loads: the cluster's model control, in the same Redis.
    gateway = Gateway(ModelRepository(settings.model_repository), batcher, cache,
                      cache_timeout_s=settings.cache_timeout_ms / 1000,
                      control=RedisControlStore(settings.redis_url))
    service = AsyncService(GatewayPath(gateway), registry, settings.redis_url, settings.runners,
                           settings.queue_settings(), settings.concurrency)
    server, port, health = grpcutil.new_server(f"{settings.host}:{settings.port}", [],
                                               transport=transport)
    return server, port, health, service


async def serve(settings: Settings) -> None:
    registry = CollectorRegistry()
    tracing.setup("meshserve-async-runner", settings.transport.otlp_endpoint)
    server, port, health, service = await create_server(settings, registry)
    gateway = service.path.gateway
    await gateway.batcher.start()
    if gateway.cache is not None:
        await gateway.cache.start()
    metrics_port = metrics.serve(registry, settings.metrics_port, settings.host)
    await server.start()
    await gateway.control.start(gateway.apply_control)
    await service.start()
    await grpcutil.set_serving(health, [], True)
    write_port_file(settings.port_file, grpc=port, metrics=metrics_port)
    log.info("async runner serving (redis %s, batcher %s, cache %s)",
             redact_url(settings.redis_url),
             settings.batcher, settings.cache or "off")
    await grpcutil.wait_for_signal()
    await grpcutil.set_serving(health, [], False)
    await service.stop(settings.grace_s)
    await server.stop(settings.grace_s)
    await gateway.control.close()
    await gateway.batcher.close()
    if gateway.cache is not None:
        await gateway.cache.close()
