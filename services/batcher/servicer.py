"""meshserve.v1.Batcher over gRPC: translation only."""

from __future__ import annotations

import asyncio
import contextlib

from meshserve.batcher import convert
from meshserve.batcher.core import Batcher, Session
from meshserve.common.errors import MeshError
from meshserve.common.grpcutil import grpc_errors
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc


class BatcherServicer(batcher_pb2_grpc.BatcherServicer):
    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    @grpc_errors
    async def Infer(self, request_iterator, context):
        session = Session(self.batcher)
        reader = asyncio.ensure_future(_read(request_iterator, session))
        try:
            while (drained := await session.drain()) is not None:
                results, received = drained
                yield convert.results_to_pb(results, received, session.blocks)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            session.close()

    @grpc_errors
    async def Statistics(self, request, context):
        stats = self.batcher.statistics(request.model, request.version)
        return batcher_pb2.StatisticsResponse(models=[convert.stats_to_pb(s) for s in stats])

    @grpc_errors
    async def LoadModel(self, request, context):
        states = await self.batcher.load_model(request.model, list(request.versions))
        return convert.states_to_pb(states)

    @grpc_errors
    async def UnloadModel(self, request, context):
        states = await self.batcher.unload_model(request.model, list(request.versions))
        return convert.states_to_pb(states)

    @grpc_errors
    async def ModelStates(self, request, context):
        return convert.states_to_pb(self.batcher.model_states(request.model))


async def _read(request_iterator, session: Session) -> None:
    """Feeds the session from the gateway's messages until it half-closes."""
    try:
        async for message in request_iterator:
            if message.result_blocks:
                session.blocks = True
            for r in message.requests:
                try:
                    inputs = [convert.tensor_from_pb(t) for t in r.inputs]
                except MeshError as e:
                    session.fail(r.request_id, e)
                    continue
                session.submit(r.request_id, r.model, r.version, inputs, list(r.outputs),
                               r.priority, r.timeout_us, r.traceparent)
            for request_id in message.cancelled:
                session.cancel(request_id)
            for request_id in message.withdrawn:
                session.cancel(request_id, withdrawn=True)
            session.received()
    finally:
        session.end_input()
