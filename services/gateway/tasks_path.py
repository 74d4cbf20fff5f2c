"""The gateway's path for async tasks (tasks.core.InferencePath): the same InferCall
(convert.to_call), the same Gateway.infer (routing, cache, then batcher) and the same
response (convert.infer_response) as a synchronous ModelInfer; plus the cheap checks a
Submit gets before its task is queued."""

from __future__ import annotations

from dataclasses import replace

from meshserve.gateway.convert import infer_message, to_call
from meshserve.gateway.core import Gateway
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.tasks.records import NewTask


class GatewayPath:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def __call__(self, request: bytes, timeout_s: float) -> bytes:
        """Runs one task (a serialized ModelInferRequest); the serialized response."""
        message = pb.ModelInferRequest.FromString(request)
        return (await infer_message(self.gateway, message, timeout_s)).SerializeToString()

    def new_task(self, request: pb.ModelInferRequest, idempotency_key: str,
                 owner: str = "") -> NewTask:
        """Validates what can be checked without running (unknown model: NOT_FOUND, bad
        inputs or parameters: INVALID_ARGUMENT), so that a bad task fails at submit."""
        call = to_call(request, None)
        # An alias is checked against its current target.
        self.gateway.check(replace(call, model=self.gateway.target_name(call.model)))
        return NewTask(request.SerializeToString(), idempotency_key, call.timeout_s, owner)
