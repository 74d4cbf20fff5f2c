"""The Python SDK: a small client for meshserve's gateway over our generated stubs.
(Triton's `tritonclient.grpc` works unchanged too.) The `meshserve` client commands are
in commands.py.

    async with AsyncClient("127.0.0.1:8001") as client:
        result = await client.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        result.outputs["predictions"]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from meshserve.common.grpcutil import MiB, channel_options
from meshserve.common.tensors import raw_bytes, to_numpy
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb
from meshserve.pb.meshserve.v1 import async_inference_pb2_grpc as apb_grpc
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_version: str
    outputs: dict[str, np.ndarray]
    cache_hit: bool
    queue_us: int
    compute_us: int
    served_by: str = ""  # "model:version" that answered (a fallback may be another model)


def _read_pem(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:8001", max_message_mb: int = 64,
                 api_key: str = "", tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        """api_key: sent as `authorization: Bearer <key>` on every call (gateways started
        with --api-keys-file require one). tls_ca: TLS, trusting this CA file (tls_cert and
        tls_key: a client certificate, for gateways that ask for one)."""
        options = channel_options(max_message_mb * MiB)
        interceptors = bearer_auth(api_key) if api_key else None
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                _read_pem(tls_ca), _read_pem(tls_key), _read_pem(tls_cert))
            self.channel = grpc.aio.secure_channel(target, credentials, options=options,
                                                   interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options,
                                                     interceptors=interceptors)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        use_cache: bool = True,
        request_id: str = "",
        route_key: str = "",
    ) -> InferResponse:
        request = infer_request(model, inputs, outputs, version, priority, None, use_cache)
        request.id = request_id
        metadata = (("x-route-key", route_key),) if route_key else None
        response = await self.stub.ModelInfer(request, timeout=timeout_s, metadata=metadata)
        return infer_result(response)

    async def server_ready(self) -> bool:
        return (await self.stub.ServerReady(pb.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self.stub.ModelReady(pb.ModelReadyRequest(name=model, version=version))).ready

    async def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version))

    async def config(self, model: str, version: str = ""):
        return (await self.stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version))).config

    async def statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self.stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version=version)
        )

    async def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        return await self.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready_only))

    async def load_model(self, model: str, versions: Sequence[str] = (),
                         default_version: str | None = None) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if versions:
            request.parameters["versions"].string_param = ",".join(versions)
        if default_version is not None:
            request.parameters["default_version"].string_param = default_version
        await self.stub.RepositoryModelLoad(request)

    async def unload_model(self, model: str) -> None:
        await self.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model))

    # ------------------------------------------------------- async inference (tasks)

    @property
    def tasks_stub(self) -> apb_grpc.AsyncInferenceStub:
        stub = getattr(self, "_tasks_stub", None)
        if stub is None:
            stub = self._tasks_stub = apb_grpc.AsyncInferenceStub(self.channel)
        return stub

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        version: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        use_cache: bool = True,
        idempotency_key: str = "",
    ) -> str:
        """Queues one inference; its task id. timeout_s counts from submission: a task not
        done by then is EXPIRED (if still waiting) or FAILED (DEADLINE_EXCEEDED)."""
        request = infer_request(model, inputs, outputs, version, priority, timeout_s, use_cache)
        reply = await self.tasks_stub.Submit(
            apb.SubmitRequest(request=request, idempotency_key=idempotency_key))
        return reply.task_id

    async def submit_batch(
        self,
        model: str,
        batch: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[str] = (),
        version: str = "",
        idempotency_keys: Sequence[str] = (),
    ) -> list[str]:
        """Queues one task per item of batch (all or none); their ids in order."""
        keys = list(idempotency_keys) or [""] * len(batch)
        requests = [
            apb.SubmitRequest(request=infer_request(model, inputs, outputs, version),
                              idempotency_key=key)
            for inputs, key in zip(batch, keys, strict=True)
        ]
        reply = await self.tasks_stub.SubmitBatch(apb.SubmitBatchRequest(requests=requests))
        return list(reply.task_ids)

    async def get_task(self, task_id: str) -> TaskResult:
        return task_result(await self.tasks_stub.Get(apb.GetRequest(task_id=task_id)))

    async def cancel_task(self, task_id: str) -> TaskResult:
        return task_result(await self.tasks_stub.Cancel(apb.CancelRequest(task_id=task_id)))

    async def watch_task(self, task_id: str) -> AsyncIterator[TaskResult]:
        """The task now, then each change of state until it is done."""
        async for task in self.tasks_stub.Watch(apb.GetRequest(task_id=task_id)):
            yield task_result(task)


    # ------------------------------------------------- traffic management (routing)

    @property
    def routing_stub(self) -> rpb_grpc.RoutingStub:
        stub = getattr(self, "_routing_stub", None)
        if stub is None:
            stub = self._routing_stub = rpb_grpc.RoutingStub(self.channel)
        return stub

    async def route_get(self, model: str) -> rpb.PolicyStatus:
        """The model's (or alias's) policy in force, with this gateway's per-route counts."""
        return await self.routing_stub.Get(rpb.GetPolicyRequest(model=model))

    async def route_set(
        self,
        model: str,
        split: Mapping[str, float] | None = None,
        shadow: Mapping[str, float] | None = None,
        fallback: Sequence[str] = (),
        fallback_queue_us: int = 0,
        alias: rpb.AliasPolicy | None = None,
        max_shadow_in_flight: int = 0,
    ) -> rpb.PolicyStatus:
        """Sets a runtime policy: split {version: weight}, shadow {version: percent},
        fallback ["model" or "model:version", ...]; every gateway applies it."""
        policy = rpb.RoutingPolicy(
            model=model,
            split=[rpb.VersionWeight(version=v, weight=w) for v, w in (split or {}).items()],
            shadow=[rpb.VersionWeight(version=v, weight=w) for v, w in (shadow or {}).items()],
            fallback=[rpb.RouteTarget(model=m, version=v)
                      for m, _, v in (t.partition(":") for t in fallback)],
            fallback_queue_us=fallback_queue_us, max_shadow_in_flight=max_shadow_in_flight,
        )
        if alias is not None:
            policy.alias.CopyFrom(alias)
        return await self.routing_stub.Set(rpb.SetPolicyRequest(policy=policy))

    async def route_clear(self, model: str) -> rpb.PolicyStatus:
        """Drops the runtime policy (the config.json one, if any, applies again)."""
        return await self.routing_stub.Set(
            rpb.SetPolicyRequest(policy=rpb.RoutingPolicy(model=model), clear=True))

    async def route_promote(self, model: str, version: str) -> rpb.PolicyStatus:
        return await self.routing_stub.Promote(rpb.PromoteRequest(model=model, version=version))

    async def route_watch(self, model: str = "") -> AsyncIterator[rpb.PolicyChange]:
        async for change in self.routing_stub.Watch(rpb.WatchPoliciesRequest(model=model)):
            yield change


class _Bearer:
    def __init__(self, api_key: str):
        self.header = ("authorization", f"Bearer {api_key}")

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the FIRST call kind it implements only, so one
# class per kind (one class with all four would leave streaming calls without the key).
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def bearer_auth(api_key: str) -> list:
    """Interceptors adding `authorization: Bearer <key>` to every call of a channel."""
    return [kind(api_key) for kind in (_BearerUnaryUnary, _BearerUnaryStream,
                                       _BearerStreamUnary, _BearerStreamStream)]


# --------------------------------------------------- requests, results and tasks


@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED
    result: InferResponse | None  # when SUCCEEDED
    error_code: str  # a grpc.StatusCode name ("" when none)
    error_message: str
    submitted_unix_ms: int
    finished_unix_ms: int

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = (),
                  version: str = "", priority: int = 0, timeout_s: float | None = None,
                  use_cache: bool = True) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw tensors; timeout_s becomes Triton's `timeout` parameter
    (for tasks: a deadline counted from submission)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        dtype, shape, data = raw_bytes(np.asarray(array))
        request.inputs.add(name=name, datatype=dtype, shape=shape)
        request.raw_input_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    if priority:
        request.parameters["priority"].int64_param = priority
    if timeout_s is not None:
        request.parameters["timeout"].int64_param = max(1, int(timeout_s * 1e6))
    if not use_cache:
        request.parameters["cache"].bool_param = False
    return request


def infer_result(response: pb.ModelInferResponse) -> InferResponse:
    arrays = {
        t.name: to_numpy(t.name, t.datatype, t.shape, raw)
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    p = response.parameters
    return InferResponse(response.model_version, arrays, p["cache_hit"].bool_param,
                       p["queue_us"].int64_param, p["compute_us"].int64_param,
                       p["served_by"].string_param)


def task_result(task: apb.Task) -> TaskResult:
    code = ""
    if task.error_code:
        code = next((c.name for c in grpc.StatusCode if c.value[0] == task.error_code),
                    str(task.error_code))
    return TaskResult(
        task.task_id, apb.Task.State.Name(task.state),
        infer_result(task.response) if task.HasField("response") else None,
        code, task.error_message, task.submitted_unix_ms, task.finished_unix_ms,
    )
