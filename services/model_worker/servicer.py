"""meshserve.v1.ModelWorker over gRPC: translation only."""

from __future__ import annotations

import logging
import time

from meshserve.common import tracing
from meshserve.common.grpcutil import grpc_errors
from meshserve.model_worker import convert
from meshserve.model_worker.execution import BatchOutcome, BatchRequest
from meshserve.model_worker.worker import Worker
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name

log = logging.getLogger(__name__)


def trace_batch(batch: BatchRequest, outcome: BatchOutcome) -> None:
    """A log line (sampled requests, errors) and a span per request of a computed batch."""
    end_ns = time.time_ns()
    for traceparent in batch.traceparents:
        ctx = tracing.parse(traceparent)
        tracing.log_request(
            log, ctx, "worker computed batch %d of %s version %s (%d rows): code %d in %.2f ms",
            batch.batch_id, batch.model, batch.version, outcome.rows, outcome.code,
            outcome.compute_ns / 1e6, error=outcome.code != 0)
        tracing.record_span("worker compute", ctx, end_ns - outcome.compute_ns, end_ns,
                            error=outcome.message, model=batch.model, version=batch.version,
                            batch_id=batch.batch_id, rows=outcome.rows)

class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, worker: Worker):
        self.worker = worker

    @grpc_errors
    async def Execute(self, request_iterator, context):
        traced: dict[int, BatchRequest] = {}  # batches carrying traceparents, by id

        async def batches():
            async for request in request_iterator:
                received = [convert.batch_from_pb(b) for b in request.batches]
                traced.update((b.batch_id, b) for b in received if any(b.traceparents))
                yield received

        async for outcomes in self.worker.execute(batches()):
            for o in outcomes:
                if (batch := traced.pop(o.batch_id, None)) is not None:
                    trace_batch(batch, o)
            yield worker_pb2.ExecuteResponse(results=[convert.outcome_to_pb(o) for o in outcomes])

    @grpc_errors
    async def Load(self, request, context):
        info = await self.worker.load(request.model, request.version, request.reload)
        return worker_pb2.LoadResponse(model=convert.model_to_pb(info))

    @grpc_errors
    async def Unload(self, request, context):
        await self.worker.unload(request.model, request.version)
        return worker_pb2.UnloadResponse()

    @grpc_errors
    async def Status(self, request, context):
        return convert.status_to_pb(self.worker.status())

    @grpc_errors
    async def WatchStatus(self, request, context):
        async for state in self.worker.watch():
            yield convert.status_to_pb(state)
