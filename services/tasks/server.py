"""Async inference wiring: inside a gateway (`attach`), or alone as `meshserve async-runner`
(`create_server`/`serve`: runners plus grpc.health.v1 and metrics, no public API)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from meshserve.batcher.client import BatcherClient
from meshserve.cache.client import CacheClient
from meshserve.common import grpcutil, metrics, tracing
from meshserve.common.backoff import Backoff
from meshserve.common.control_store import RedisControlStore
from meshserve.common.logs import redact_url
from meshserve.common.repository import ModelRepository
from meshserve.common.settings import write_port_file
from meshserve.gateway.core import Gateway
from meshserve.pb.meshserve.v1 import async_inference_pb2, async_inference_pb2_grpc
from meshserve.tasks.config import Settings
from meshserve.tasks.core import AsyncTasks
from meshserve.tasks.gateway_path import GatewayPath
from meshserve.tasks.metrics import TaskMetrics
from meshserve.tasks.queues import MemoryQueue, RedisQueue, TaskQueue
from meshserve.tasks.records import QueueSettings
from meshserve.tasks.runner import Runner
from meshserve.tasks.servicer import AsyncInferenceServicer

log = logging.getLogger(__name__)

SERVICE = async_inference_pb2.DESCRIPTOR.services_by_name["AsyncInference"].full_name


def make_queue(redis_url: str, settings: QueueSettings) -> TaskQueue:
    return RedisQueue(redis_url, settings) if redis_url else MemoryQueue(settings)


class AsyncService:
    """A queue, the API over it, and `runner_count` runners feeding the gateway's path."""

    def __init__(self, gateway: Gateway, registry: CollectorRegistry, redis_url: str,
                 runner_count: int, queue_settings: QueueSettings, concurrency: int = 256):
        self.queue = make_queue(redis_url, queue_settings)
        self.metrics = TaskMetrics(registry)
        self.tasks = AsyncTasks(self.queue, self.metrics)
        self.path = GatewayPath(gateway)
        self.runners = [Runner(self.queue, self.path, self.metrics, concurrency, i)
                        for i in range(runner_count)]
        self.redis_url = redis_url

    async def start(self) -> None:
        """Waits until the queue answers (Redis may start after us), then starts runners."""
        backoff = Backoff(max_s=2.0)
        while True:
            try:
                await self.queue.start()
                break
            except Exception as e:  # noqa: BLE001 - retried with a backoff
                log.info("waiting for the task store at %s (%s)", redact_url(self.redis_url), e)
                await backoff.wait()
        for runner in self.runners:
            runner.start()
        log.info("async inference: %s queue, %d runner(s) here",
                 "Redis Streams" if self.queue.durable else "in-process (not durable)",
                 len(self.runners))

    async def stop(self, grace_s: float) -> None:
        await asyncio.gather(*(r.stop(grace_s) for r in self.runners))
        await self.queue.close()


def attach(server, gateway: Gateway, registry: CollectorRegistry, redis_url: str,
           runner_count: int, queue_settings: QueueSettings) -> AsyncService:
    """Serves meshserve.v1.AsyncInference on a gateway's server."""
    service = AsyncService(gateway, registry, redis_url, runner_count, queue_settings)
    async_inference_pb2_grpc.add_AsyncInferenceServicer_to_server(
        AsyncInferenceServicer(service.tasks, service.path), server)
    return service


# ------------------------------------------------------------- meshserve async-runner


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
    service = AsyncService(gateway, registry, settings.redis_url, settings.runners,
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
