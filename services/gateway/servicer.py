"""inference.GRPCInferenceService: translates the v2 protocol to Gateway calls and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshserve import __version__
from meshserve.common import errors, tracing
from meshserve.common.auth import ADMIN, CALLER
from meshserve.common.grpcutil import grpc_errors, status_of
from meshserve.gateway import convert, protection
from meshserve.gateway.core import Gateway, InferCall, InferOutcome
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "parameters",
    "response_cache",
]
# Names this gateway where an answer covers it alone (ModelStatistics' cache counts).
GATEWAY_ID = f"{socket.gethostname()}/{os.getpid()}"
UNSUPPORTED_SHM = "shared memory is not supported by meshserve: send tensors in raw_input_contents"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "meshserve_gateway_requests", "Inference requests by model and status code",
            ["model", "code"], registry=registry,
        )
        self.seconds = Histogram(
            "meshserve_gateway_request_seconds", "Inference request latency at the gateway",
            ["model"], registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )


def _int_param(params: dict, key: str) -> int:
    value = params.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidInput(f"request parameter '{key}' must be an integer, got {value!r}")
    return value


# Triton's sequence batcher (stateful models) correlates requests by these parameters.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def to_call(request: pb.ModelInferRequest, time_remaining: float | None,
            route_key: str = "") -> InferCall:
    """Honoured parameters: priority, timeout, cache; sequence_* are refused; any other
    parameter is ignored (Triton hands them to the backend; our models take none)."""
    convert.check_bounds(request)
    params = convert.params(request.parameters)
    for key in SEQUENCE_PARAMETERS:
        if key in params:
            raise errors.InvalidInput(
                f"request parameter '{key}': sequence batching is not supported "
                "(meshserve serves stateless models; send each request on its own)")
    priority = _int_param(params, "priority")
    timeout_us = _int_param(params, "timeout")
    if timeout_us < 0:
        raise errors.InvalidInput(f"request parameter 'timeout' must be >= 0, got {timeout_us}")
    timeouts = [t for t in (time_remaining, timeout_us / 1e6 if timeout_us else None) if t is not None]
    use_cache = params.get("cache", True)
    if not isinstance(use_cache, bool):
        raise errors.InvalidInput(f"request parameter 'cache' must be a bool, got {use_cache!r}")
    if not request.model_name:
        raise errors.InvalidInput("model_name is required")
    return InferCall(
        model=request.model_name,
        version=request.model_version,
        inputs=convert.infer_inputs(request),
        outputs=convert.requested_outputs(request),
        priority=priority,
        timeout_s=min(timeouts) if timeouts else None,
        use_cache=use_cache,
        route_key=route_key or request.id,
    )


def route_key(context) -> str:
    """Sticky routing key: gRPC metadata x-route-key ("" when absent)."""
    return route_and_trace(context.invocation_metadata(), 0.0)[0]


def route_and_trace(metadata, sample_ratio: float) -> tuple[str, tracing.TraceContext | None]:
    """The sticky routing key (metadata x-route-key, "" when absent) and the trace context:
    the client's traceparent, else a new sampled trace at sample_ratio, else None (an
    unsampled request the client did not trace carries no context at all). One pass."""
    key, trace = "", None
    for name, value in metadata or ():
        if name == "x-route-key":
            key = value if isinstance(value, str) else value.decode()
        elif name == tracing.METADATA_KEY:
            trace = tracing.parse(value)
    if trace is None and sample_ratio > 0 and random.random() < sample_ratio:
        trace = tracing.new_context(True)
    return key, trace


async def infer_message(gateway: Gateway, request: pb.ModelInferRequest,
                        time_remaining: float | None, key: str = "") -> pb.ModelInferResponse:
    """One ModelInferRequest through the gateway (routing, cache, batcher) to its response:
    the path of ModelInfer, ModelStreamInfer and async tasks alike."""
    outcome: InferOutcome = await gateway.infer(to_call(request, time_remaining, key))
    return convert.infer_response(
        request, outcome.version, outcome.outputs, outcome.cache_hit,
        outcome.queue_ns, outcome.compute_ns, outcome.model,
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """shed: the gateway's Protection when no interceptor applies it (no API keys, no rate
    limits): then only its concurrency limit is checked, here, per inference."""

    def __init__(self, gateway: Gateway, metrics: GatewayMetrics, max_stream_concurrency: int,
                 trace_sample_ratio: float = 0.0, shed: protection.Protection | None = None):
        self.gateway = gateway
        self.metrics = metrics
        self.max_stream_concurrency = max_stream_concurrency
        self.trace_sample_ratio = trace_sample_ratio
        self.shed = shed
        # (model, code) -> the bound metric children: no label lookup per request. Models
        # are known ones (an unknown name counts as "_unknown"), codes a fixed set.
        self._bound: dict[tuple[str, str], tuple] = {}

    def _observe(self, model: str, code: str, seconds: float) -> None:
        bound = self._bound.get((model, code))
        if bound is None:
            bound = self._bound[(model, code)] = (
                self.metrics.requests.labels(model, code), self.metrics.seconds.labels(model))
        bound[0].inc()
        bound[1].observe(seconds)

    async def _infer(self, request: pb.ModelInferRequest, time_remaining,
                     key: str = "", trace: tracing.TraceContext | None = None
                     ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        code, detail = "OK", ""
        try:
            if trace is None:
                return await infer_message(self.gateway, request, time_remaining, key)
            # The batcher and cache clients read the context (tracing.current) of this task.
            with tracing.span("gateway ModelInfer", trace, model=request.model_name) as hop, \
                    tracing.use(hop):
                response = await infer_message(self.gateway, request, time_remaining, key)
            tracing.log_request(
                log, trace, "ModelInfer %s version %s: OK in %.2f ms (cache_hit %s)",
                request.model_name, response.model_version, (time.perf_counter() - started) * 1e3,
                response.parameters["cache_hit"].bool_param)
            return response
        except errors.MeshError as e:
            code, detail = status_of(e).name, str(e)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            if code != "OK":
                # An error is logged whatever the sampling, under a trace id of its own
                # when the client sent none.
                tracing.log_request(log, trace or tracing.new_context(False),
                                    "ModelInfer %s version %r: %s in %.2f ms: %s",
                                    request.model_name, request.model_version, code,
                                    (time.perf_counter() - started) * 1e3, detail, error=True)
            self._observe(self.gateway.metric_label(request.model_name), code,
                          time.perf_counter() - started)

    @grpc_errors
    async def ModelInfer(self, request, context):
        key, trace = route_and_trace(context.invocation_metadata(), self.trace_sample_ratio)
        shed = self.shed
        if shed is None:
            return await self._infer(request, context.time_remaining(), key, trace)
        denied = shed.acquire()
        if denied is not None:
            await protection.abort(context, denied)
        try:
            return await self._infer(request, context.time_remaining(), key, trace)
        finally:
            shed.release()

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests on one stream run concurrently (bounded); each response or error is
        written as it completes. An error answers that request only: the stream goes on."""
        out: asyncio.Queue = asyncio.Queue()
        # A traceparent on the stream's metadata covers every request on it; else each
        # request is sampled on its own.
        key, stream_trace = route_and_trace(context.invocation_metadata(), 0.0)
        ratio = self.trace_sample_ratio
        slots = asyncio.Semaphore(self.max_stream_concurrency)
        tasks: set[asyncio.Task] = set()
        shed = self.shed

        async def one(request):
            # The request's slot is released once its response is written (below): a
            # client that never reads holds at most max_stream_concurrency of them here.
            try:
                trace = stream_trace or (
                    tracing.new_context(True) if ratio and random.random() < ratio else None)
                response = await self._infer(request, context.time_remaining(), key, trace)
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except errors.MeshError as e:
                out.put_nowait(_stream_error(request, str(e)))
            except Exception:
                log.exception("stream inference failed")
                out.put_nowait(_stream_error(request, "internal error"))
            finally:
                if shed is not None:
                    shed.release()

        async def read():
            async for request in request_iterator:
                await slots.acquire()
                if shed is not None and (denied := shed.acquire()) is not None:
                    out.put_nowait(protection.stream_error(request, denied))
                    continue
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
                slots.release()
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.gateway.server_ready())

    @grpc_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(
            ready=await self.gateway.model_ready(self.gateway.target_name(request.name),
                                                 request.version)
        )

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="meshserve", version=__version__, extensions=EXTENSIONS
        )

    @grpc_errors
    async def ModelMetadata(self, request, context):
        name = self.gateway.target_name(request.name)  # an alias answers for its target
        config, _version = self.gateway.catalog.resolve(name, request.version)
        return convert.model_metadata(config, self.gateway.versions(name))

    @grpc_errors
    async def ModelConfig(self, request, context):
        name = self.gateway.target_name(request.name)  # an alias answers for its target
        config, version = self.gateway.catalog.resolve(name, request.version)
        graphs = await self.gateway.graph_buckets(name, version)
        return pb.ModelConfigResponse(config=convert.model_config(config, graphs=graphs))

    @grpc_errors
    async def ModelStatistics(self, request, context):
        stats, batchers = await self.gateway.statistics(request.name, request.version)
        # Say what the numbers cover: inference counts are summed over these batchers; the
        # cache counts are this gateway's own (each gateway counts its cache lookups).
        context.set_trailing_metadata((
            ("meshserve-statistics-batchers", ",".join(batchers)),
            ("meshserve-statistics-cache", f"this gateway only ({GATEWAY_ID})"),
        ))
        return pb.ModelStatisticsResponse(
            model_stats=[convert.model_statistics(*s) for s in stats]
        )

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        rows = await self.gateway.index(request.ready)
        key = CALLER.get()
        if key is not None:  # only the caller's models; file paths for admins only
            root = str(self.gateway.repository.root)
            rows = [(n, v, s, r if key.has(ADMIN) else r.replace(root, "<repository>"))
                    for n, v, s, r in rows if key.allows(n)]
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
            for n, v, s, r in rows
        ])

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        versions, default = load_parameters(request.parameters)
        await self.gateway.load(request.model_name, versions, default)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        await self.gateway.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, UNSUPPORTED_SHM)

    async def SystemSharedMemoryUnregister(self, request, context):
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, UNSUPPORTED_SHM)

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "trace settings are not supported yet")

    async def LogSettings(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "log settings are not supported yet")


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name[:convert.MAX_NAME_CHARS],
            id=request.id[:convert.MAX_ID_CHARS]),
    )


def load_parameters(parameters) -> tuple[list[str], str | None]:
    """RepositoryModelLoad parameters: `versions` ("1,2" or an int) picks versions,
    `default_version` sets the default. A load names a repository model, never a path:
    Triton's `config` override and `file:` uploads are refused."""
    versions: list[str] = []
    default = None
    for key, p in parameters.items():
        kind = p.WhichOneof("parameter_choice")
        value = getattr(p, kind) if kind else None
        if key == "versions" or key == "version":
            text = str(value) if not isinstance(value, bytes) else value.decode()
            versions = [v.strip() for v in text.split(",") if v.strip()]
            for v in versions:
                if not v.isdigit() or int(v) < 1:
                    raise errors.InvalidInput(f"load parameter '{key}': {v!r} is not a version")
            versions = [str(int(v)) for v in versions]
        elif key == "default_version":
            default = str(value)
            if not default.isdigit():
                raise errors.InvalidInput(f"load parameter 'default_version': {value!r}")
            default = str(int(default))
        elif key == "config" or key.startswith("file:"):
            raise errors.InvalidInput(
                f"load parameter '{key}' is not supported: meshserve loads models from its "
                "repository only; edit the model's config.json there"
            )
        else:
            raise errors.InvalidInput(
                f"unknown load parameter '{key}' (supported: versions, default_version)"
            )
    return versions, default
