"""Wires the model worker: gRPC server with health, metrics, models loaded at start."""

from __future__ import annotations

import logging

import torch

from meshserve.common import metrics, tracing
from meshserve.common.grpcutil import new_server, set_serving, wait_for_signal
from meshserve.common.repository import ModelRepository
from meshserve.common.settings import write_port_file
from meshserve.model_worker.config import Settings
from meshserve.model_worker.servicer import SERVICE_NAME, ModelWorkerServicer
from meshserve.model_worker.worker import Worker
from meshserve.pb.meshserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


async def create_server(settings: Settings):
    """(server, port, worker, health servicer); nothing loaded, health NOT_SERVING."""
    repository = ModelRepository(settings.model_repository)
    server, port, health = new_server(f"{settings.host}:{settings.port}", [SERVICE_NAME],
                                      transport=settings.transport)
    torch.set_num_threads(settings.threads)
    worker = Worker(
        repository,
        worker_id=settings.worker_name(port),
        device=settings.device,
        max_models=settings.max_models,
        max_memory_bytes=settings.max_memory_bytes,
        max_in_flight=settings.max_in_flight,
        cuda_graphs=settings.cuda_graphs,
    )
    worker_pb2_grpc.add_ModelWorkerServicer_to_server(ModelWorkerServicer(worker), server)
    return server, port, worker, health


async def start(settings: Settings):
    """Starts the server, loads and warms --load, then reports SERVING."""
    server, port, worker, health = await create_server(settings)
    await server.start()
    try:
        await worker.load_startup(settings.load)
    except BaseException:
        await server.stop(0)
        worker.close()
        raise
    await set_serving(health, [SERVICE_NAME], True)
    return server, port, worker, health


async def serve(settings: Settings) -> None:
    tracing.setup("meshserve-worker", settings.transport.otlp_endpoint)
    server, port, worker, health = await start(settings)
    metrics_port = metrics.serve(worker.metrics.registry, settings.metrics_port, settings.host)
    write_port_file(settings.port_file, grpc=port, metrics=metrics_port)
    log.info("model worker %s on port %d, device %s, models %s", worker.worker_id, port,
             settings.device, [f"{m.model}:{m.version}" for m in worker.cache.models()])
    await wait_for_signal()
    log.info("draining: in-flight batches get %.1fs", settings.grace_s)
    await set_serving(health, [SERVICE_NAME], False)
    # Batchers stop sending new batches and end their streams once answered.
    worker.drain()
    await server.stop(settings.grace_s)
    worker.close()
