"""meshserve.v1.AsyncInference: translates protobuf to AsyncTasks calls and back."""

from __future__ import annotations

from meshserve.common import errors
from meshserve.common.auth import owner
from meshserve.common.grpcutil import grpc_errors
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb
from meshserve.pb.meshserve.v1 import async_inference_pb2_grpc as apb_grpc
from meshserve.tasks.core import AsyncTasks, InferencePath
from meshserve.tasks.records import TaskView


def to_task(view: TaskView) -> apb.Task:
    task = apb.Task(
        task_id=view.task_id, state=int(view.state), error_code=view.error_code,
        error_message=view.error_message, submitted_unix_ms=view.submitted_ms,
        finished_unix_ms=view.finished_ms,
    )
    if view.response:
        task.response.CopyFrom(pb.ModelInferResponse.FromString(view.response))
    return task


class AsyncInferenceServicer(apb_grpc.AsyncInferenceServicer):
    def __init__(self, tasks: AsyncTasks, path: InferencePath):
        self.tasks = tasks
        self.path = path

    @grpc_errors
    async def Submit(self, request, context):
        task = self.path.new_task(request.request, request.idempotency_key, owner())
        [task_id] = await self.tasks.submit([task])
        return apb.SubmitResponse(task_id=task_id)

    @grpc_errors
    async def SubmitBatch(self, request, context):
        tasks = []
        for i, r in enumerate(request.requests):
            try:
                tasks.append(self.path.new_task(r.request, r.idempotency_key, owner()))
            except errors.MeshError as e:
                raise type(e)(f"requests[{i}]: {e}") from None
        return apb.SubmitBatchResponse(task_ids=await self.tasks.submit(tasks))

    @grpc_errors
    async def Get(self, request, context):
        return to_task(await self.tasks.get(request.task_id, owner()))

    @grpc_errors
    async def Cancel(self, request, context):
        return to_task(await self.tasks.cancel(request.task_id, owner()))

    @grpc_errors
    async def Watch(self, request, context):
        async for view in self.tasks.watch(request.task_id, owner()):
            yield to_task(view)
