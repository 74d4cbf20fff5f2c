"""The batcher's gRPC server: wiring, start-up (first worker, --load) and shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from meshserve.batcher import control, routing_store
from meshserve.batcher.config import Settings
from meshserve.batcher.connection import WorkerDirectory
from meshserve.batcher.core import Batcher, BatcherOptions
from meshserve.batcher.servicer import BatcherServicer
from meshserve.batcher.stats import Statistics
from meshserve.batcher.workers import WorkerPool
from meshserve.common import hops, metrics, tracing
from meshserve.common.control_store import BoardControlStore, RedisControlStore
from meshserve.common.grpcutil import new_server, set_serving, wait_for_signal
from meshserve.common.repository import ModelRepository
from meshserve.common.settings import write_port_file
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = batcher_pb2.DESCRIPTOR.services_by_name["Batcher"].full_name


@dataclass(eq=False)
class Runtime:
    """What a running batcher holds, to start up and release."""

    batcher: Batcher
    pool: WorkerPool
    directory: WorkerDirectory
    health: object
    registry: CollectorRegistry
    control: BoardControlStore | RedisControlStore
    _serving: bool | None = None
    _tasks: set = field(default_factory=set)

    def track_health(self) -> None:
        """SERVING while at least one worker is connected, NOT_SERVING otherwise."""
        def on_change() -> None:
            serving = bool(self.pool.connected())
            if serving != self._serving:
                self._serving = serving
                task = asyncio.get_running_loop().create_task(
                    set_serving(self.health, [SERVICE_NAME], serving))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.pool.listeners.append(on_change)
        on_change()

    async def startup(self, load: tuple[str, ...], wait_s: float) -> None:
        """Waits (bounded) for a first worker, then makes sure --load models are loaded."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + wait_s
        while not self.pool.connected() and loop.time() < limit:
            await self.pool.wait_change(limit - loop.time())
        if not self.pool.connected():
            log.warning("no model worker connected after %.0fs; serving anyway", wait_s)
        names = self.batcher.repository.names() if "all" in load else list(load)
        # The cluster's model control decides for the models it knows (an unload through
        # a gateway holds across batcher restarts).
        names = [n for n in names if n not in self.batcher.controls]
        keys = self.batcher.want(names) + [
            (c.model, v) for c in self.batcher.controls.values() if c.loaded for v in c.versions]
        await asyncio.gather(*(self.batcher.ensure_loaded(k) for k in keys))
        for s in self.batcher.model_states():
            if (s.model, s.version) in keys:
                log.info("model %s version %s: %s %s", s.model, s.version, s.state, s.reason)

    async def close(self) -> None:
        await self.control.close()
        await self.directory.close()
        await self.batcher.close()


async def create_server(settings: Settings, registry: CollectorRegistry | None = None):
    """Builds and starts the server on settings.port (0 in tests).
    Returns (server, port, runtime)."""
    registry = registry or CollectorRegistry()
    repository = ModelRepository(settings.model_repository)
    pool = WorkerPool()
    options = BatcherOptions(
        max_retries=settings.max_retries, max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size,
        adaptive=settings.adaptive, rejoin_wait_s=settings.rejoin_wait_s,
    )
    batcher = Batcher(repository, pool, options, Statistics(registry))
    directory = WorkerDirectory(settings.workers, pool, settings.max_in_flight_per_worker,
                                transport=settings.transport)
    server, port, health = new_server(f"{settings.host}:{settings.port}", [SERVICE_NAME],
                                      transport=settings.transport)
    batcher_pb2_grpc.add_BatcherServicer_to_server(BatcherServicer(batcher), server)
    routing_store.attach(server)  # meshserve.v1.RoutingStore for gateways without Redis
    board = control.attach(server)  # meshserve.v1.ModelControlStore, idem
    store = RedisControlStore(settings.redis_url) if settings.redis_url \
        else BoardControlStore(board)
    hops.register(registry, directory.hop_counts)
    runtime = Runtime(batcher, pool, directory, health, registry, store)
    await server.start()
    await set_serving(health, [SERVICE_NAME], False)
    runtime.track_health()
    await directory.start()
    await store.start(batcher.apply_control)
    return server, port, runtime


async def serve(settings: Settings) -> None:
    tracing.setup("meshserve-batcher", settings.transport.otlp_endpoint)
    server, port, runtime = await create_server(settings)
    metrics_port = metrics.serve(runtime.registry, settings.metrics_port, settings.host)
    await runtime.startup(settings.load, settings.startup_wait_s)
    write_port_file(settings.port_file, grpc=port, metrics=metrics_port)
    log.info("batcher serving on %s:%d with workers %s", settings.host, port,
             ", ".join(settings.workers) or "(none)")
    await wait_for_signal()
    log.info("draining: refusing new requests, finishing queued ones for up to %.1fs",
             settings.grace_s)
    await set_serving(runtime.health, [SERVICE_NAME], False)
    runtime.batcher.draining = True
    await server.stop(settings.grace_s)
    await runtime.close()
