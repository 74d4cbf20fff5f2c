"""meshserve.v1.ModelWorker over gRPC: translation only."""

from __future__ import annotations

from meshserve.common.grpcutil import grpc_errors
from meshserve.model_worker import convert
from meshserve.model_worker.worker import Worker
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, worker: Worker):
        self.worker = worker

    @grpc_errors
    async def Execute(self, request_iterator, context):
        async def batches():
            async for request in request_iterator:
                yield [convert.batch_from_pb(b) for b in request.batches]

        async for outcomes in self.worker.execute(batches()):
            yield worker_pb2.ExecuteResponse(results=[convert.outcome_to_pb(o) for o in outcomes])

    @grpc_errors
    async def Load(self, request, context):
        info = await self.worker.load(request.model, request.version)
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
