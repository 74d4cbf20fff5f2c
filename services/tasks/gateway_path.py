"""Tasks through the gateway's normal path: the same InferCall (servicer.to_call), the same
Gateway.infer (cache, then batcher) and the same response (convert.infer_response) as a
synchronous ModelInfer; plus the cheap checks a Submit gets before its task is queued."""

from __future__ import annotations

from meshserve.common.errors import InvalidInput
from meshserve.common.validation import resolve_outputs, validate_inputs
from meshserve.gateway.core import Gateway
from meshserve.gateway.servicer import infer_message, to_call
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.tasks.records import NewTask


class GatewayPath:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def __call__(self, request: bytes, timeout_s: float) -> bytes:
        """Runs one task (a serialized ModelInferRequest); the serialized response."""
        message = pb.ModelInferRequest.FromString(request)
        return (await infer_message(self.gateway, message, timeout_s)).SerializeToString()

    def new_task(self, request: pb.ModelInferRequest, idempotency_key: str) -> NewTask:
        """Validates what can be checked without running (unknown model: NOT_FOUND, bad
        inputs or parameters: INVALID_ARGUMENT), so that a bad task fails at submit."""
        call = to_call(request, None)
        model = self.gateway.target_name(call.model)  # an alias checks its current target
        config, _version = self.gateway.catalog.resolve(model, call.version)
        validate_inputs(config, call.inputs)
        resolve_outputs(config, call.outputs)
        if call.priority < 0 or call.priority > config.batching.priority_levels:
            raise InvalidInput(
                f"priority {call.priority} is out of range for model '{config.name}' "
                f"(1 is highest, {config.batching.priority_levels} lowest, 0 the default)"
            )
        return NewTask(request.SerializeToString(), idempotency_key, call.timeout_s)
