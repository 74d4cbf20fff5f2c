"""Async inference wiring: a queue, the API over it and runners feeding an InferencePath;
served inside a gateway (`attach`), or alone by `meshserve async-runner`
(gateway/async_runner.py: runners plus grpc.health.v1 and metrics, no public API)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from meshserve.common.backoff import Backoff
from meshserve.common.logs import redact_url
from meshserve.pb.meshserve.v1 import async_inference_pb2, async_inference_pb2_grpc
from meshserve.tasks.core import AsyncTasks, InferencePath
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
    """A queue, the API over it, and `runner_count` runners feeding `path`."""

    def __init__(self, path: InferencePath, registry: CollectorRegistry, redis_url: str,
                 runner_count: int, queue_settings: QueueSettings, concurrency: int = 256):
        self.queue = make_queue(redis_url, queue_settings)
        self.metrics = TaskMetrics(registry)
        self.tasks = AsyncTasks(self.queue, self.metrics)
        self.path = path
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


def attach(server, path: InferencePath, registry: CollectorRegistry, redis_url: str,
           runner_count: int, queue_settings: QueueSettings) -> AsyncService:
    """Serves meshserve.v1.AsyncInference on a gateway's server."""
    service = AsyncService(path, registry, redis_url, runner_count, queue_settings)
    async_inference_pb2_grpc.add_AsyncInferenceServicer_to_server(
        AsyncInferenceServicer(service.tasks, service.path), server)
    return service
