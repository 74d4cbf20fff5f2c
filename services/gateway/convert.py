"""Pure converters between the public v2 protobuf messages and the gateway's records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from meshserve.common.datatypes import DATATYPES, datatype
from meshserve.common.errors import InvalidInput
from meshserve.common.repository import ModelConfig, TensorSpec
from meshserve.common.validation import RequestedOutput, WireTensor
from meshserve.gateway.core import Gateway, InferCall, InferOutcome
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import model_config_pb2 as mc
from meshserve.pb.meshserve.v1 import batcher_pb2

# Which InferTensorContents field carries each datatype (FP16/BF16 travel raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# What one request may carry: names and ids are echoed, logged and kept while it runs.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 128  # model, input and output names (model names: common.repository)
MAX_VERSION_CHARS = 20
MAX_TENSORS = 64  # inputs, and requested outputs
MAX_DIMS = 16
MAX_PARAMETERS = 32
MAX_PARAMETER_KEY_CHARS = 64
MAX_PARAMETER_VALUE_CHARS = 1024


def _too_long(what: str, value: str, limit: int) -> InvalidInput:
    return InvalidInput(f"{what} is {len(value)} characters long, at most {limit}: "
                        f"{value[:40]!r}...")


def _check_parameters(where: str, parameters: Mapping[str, pb.InferParameter]) -> None:
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(f"{where}: {len(parameters)} parameters, at most {MAX_PARAMETERS}")
    for key, p in parameters.items():
        if len(key) > MAX_PARAMETER_KEY_CHARS:
            raise _too_long(f"{where}: a parameter name", key, MAX_PARAMETER_KEY_CHARS)
        if p.WhichOneof("parameter_choice") == "string_param" \
                and len(p.string_param) > MAX_PARAMETER_VALUE_CHARS:
            raise _too_long(f"{where}: parameter '{key}'", p.string_param,
                            MAX_PARAMETER_VALUE_CHARS)


def check_bounds(request: pb.ModelInferRequest) -> None:
    """Lengths and counts of everything a request names (INVALID_ARGUMENT past a bound),
    before any of it is stored, echoed or logged."""
    for what, value, limit in (("id", request.id, MAX_ID_CHARS),
                               ("model_name", request.model_name, MAX_NAME_CHARS),
                               ("model_version", request.model_version, MAX_VERSION_CHARS)):
        if len(value) > limit:
            raise _too_long(what, value, limit)
    if request.parameters:  # (an empty map is the usual case: no view built for it)
        _check_parameters("request", request.parameters)
    for kind, tensors in (("inputs", request.inputs), ("outputs", request.outputs)):
        if len(tensors) > MAX_TENSORS:
            raise InvalidInput(f"{len(tensors)} {kind}, at most {MAX_TENSORS}")
        for t in tensors:
            if len(t.name) > MAX_NAME_CHARS:
                raise _too_long(f"the name of one of the {kind}", t.name, MAX_NAME_CHARS)
            if t.parameters:
                _check_parameters(f"{kind[:-1]} '{t.name}'", t.parameters)
            if kind == "inputs":
                if len(t.shape) > MAX_DIMS:
                    raise InvalidInput(
                        f"input '{t.name}': {len(t.shape)} dimensions, at most {MAX_DIMS}")
                if len(t.datatype) > MAX_NAME_CHARS:
                    raise _too_long(f"input '{t.name}': datatype", t.datatype, MAX_NAME_CHARS)


def param_value(p: pb.InferParameter) -> object:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def params(m: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    if not m:
        return {}
    return {k: param_value(v) for k, v in m.items()}


def _typed_to_raw(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    dt = datatype(tensor.datatype)
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None or dt.numpy is None or dt.itemsize == 0:
        raise InvalidInput(
            f"input '{tensor.name}': {tensor.datatype} data must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    # np.array over a repeated scalar field copies in C, not element by element in Python.
    array = np.array(values, dtype=dt.numpy)
    expected = int(np.prod(tensor.shape)) if len(tensor.shape) else 1
    if array.size != expected:
        raise InvalidInput(
            f"input '{tensor.name}': {array.size} values in contents.{field}, expected "
            f"{expected} for shape {list(tensor.shape)}"
        )
    return array.tobytes()


def infer_inputs(request: pb.ModelInferRequest) -> list[WireTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send raw data "
            "for every input (in the order of inputs) or for none"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(
                    f"input '{tensor.name}': both contents and raw_input_contents are set"
                )
            data = raw[i]
        else:
            data = _typed_to_raw(tensor)
        inputs.append(WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    return inputs


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    return [
        RequestedOutput(o.name, tuple(sorted(params(o.parameters).items())))
        for o in request.outputs
    ]


def infer_response(
    request: pb.ModelInferRequest,
    version: str,
    outputs: Iterable,  # meshserve.v1.Tensor, in the order to return
    cache_hit: bool,
    queue_ns: int = 0,
    compute_ns: int = 0,
    served_model: str = "",  # the model that answered (a fallback's), "": the one asked
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    for t in outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(t.data)
    response.parameters["cache_hit"].bool_param = cache_hit
    response.parameters["queue_us"].int64_param = queue_ns // 1000
    response.parameters["compute_us"].int64_param = compute_ns // 1000
    response.parameters["served_by"].string_param = f"{served_model or request.model_name}:{version}"
    return response


def _tensor_metadata(config: ModelConfig, spec: TensorSpec):
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=config.full_shape(spec)
    )


def model_metadata(config: ModelConfig, versions: Iterable[str]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=config.name,
        versions=list(versions),
        platform=config.platform,
        inputs=[_tensor_metadata(config, t) for t in config.inputs],
        outputs=[_tensor_metadata(config, t) for t in config.outputs],
    )


def model_config(config: ModelConfig, device_kind: str = "KIND_AUTO",
                 graphs: tuple[Sequence[int], Sequence[int]] | None = None) -> mc.ModelConfig:
    """Triton's ModelConfig: dims exclude the batch dimension when max_batch_size > 0.
    graphs: (batch sizes replayed as CUDA graphs, batch sizes run eagerly because their
    capture failed) as the workers holding the version report them; None when no worker
    holds it (then `optimization.cuda.graphs` says what the config asks for)."""
    b = config.batching
    out = mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend="pytorch",
        max_batch_size=config.max_batch_size,
        input=[
            mc.ModelInput(name=t.name, data_type=DATATYPES[t.datatype].triton_enum, dims=t.dims)
            for t in config.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=DATATYPES[t.datatype].triton_enum, dims=t.dims)
            for t in config.outputs
        ],
        default_model_filename=config.model_filename,
        response_cache=mc.ModelResponseCache(enable=config.cache.enabled),
        instance_group=[mc.ModelInstanceGroup(
            name=config.name, kind=mc.ModelInstanceGroup.Kind.Value(device_kind), count=1)],
    )
    policy = config.version_policy
    if policy.kind == "all":
        out.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        out.version_policy.specific.versions.extend(policy.versions)
    else:
        out.version_policy.latest.num_versions = policy.num_versions
    if config.max_batch_size > 0:
        out.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=b.preferred_batch_sizes,
            max_queue_delay_microseconds=b.max_queue_delay_us,
            priority_levels=b.priority_levels if b.priority_levels > 1 else 0,
            default_priority_level=b.default_priority_level if b.priority_levels > 1 else 0,
            default_queue_policy=mc.ModelQueuePolicy(
                default_timeout_microseconds=b.default_timeout_us,
                allow_timeout_override=True,
                max_queue_size=b.max_queue_size,
            ),
        ))
    if graphs is None:
        out.optimization.cuda.graphs = config.max_batch_size > 0 and config.cuda_graphs
    else:
        captured, eager = graphs
        out.optimization.cuda.graphs = bool(captured)
        for key, sizes in (("cuda_graph_batch_sizes", captured), ("eager_batch_sizes", eager)):
            if sizes:
                out.parameters[key].string_value = ",".join(str(s) for s in sizes)
    return out


def _duration(d: batcher_pb2.Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(
    s: batcher_pb2.ModelStats, cache_hits: tuple[int, int, int], cache_misses: tuple[int, int]
) -> pb.ModelStatistics:
    """Triton's ModelStatistics from the batcher's counts plus the gateway's cache counts.

    cache_hits is (requests, rows, ns); cache_misses is (requests, ns). A hit counts as an
    inference and a success, never as an execution."""
    hit_requests, hit_rows, hit_ns = cache_hits
    stats = pb.ModelStatistics(
        name=s.model,
        version=s.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count + hit_rows,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=pb.StatisticDuration(
                count=s.success.count + hit_requests, ns=s.success.ns + hit_ns
            ),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_infer=_duration(s.compute_infer),
            cache_hit=pb.StatisticDuration(count=hit_requests, ns=hit_ns),
            cache_miss=pb.StatisticDuration(count=cache_misses[0], ns=cache_misses[1]),
        ),
    )
    for b in s.batch_stats:
        stats.batch_stats.add(batch_size=b.batch_size, compute_infer=_duration(b.compute_infer))
    return stats


# ------------------------------------------------- a ModelInferRequest through the gateway


def _int_param(params: dict, key: str) -> int:
    value = params.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"request parameter '{key}' must be an integer, got {value!r}")
    return value


# Triton's sequence batcher (stateful models) correlates requests by these parameters.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def to_call(request: pb.ModelInferRequest, time_remaining: float | None,
            route_key: str = "") -> InferCall:
    """Honoured parameters: priority, timeout, cache; sequence_* are refused; any other
    parameter is ignored (Triton hands them to the backend; our models take none)."""
    check_bounds(request)
    values = params(request.parameters)
    for key in SEQUENCE_PARAMETERS:
        if key in values:
            raise InvalidInput(
                f"request parameter '{key}': sequence batching is not supported "
                "(meshserve serves stateless models; send each request on its own)")
    priority = _int_param(values, "priority")
    timeout_us = _int_param(values, "timeout")
    if timeout_us < 0:
        raise InvalidInput(f"request parameter 'timeout' must be >= 0, got {timeout_us}")
    timeouts = [t for t in (time_remaining, timeout_us / 1e6 if timeout_us else None) if t is not None]
    use_cache = values.get("cache", True)
    if not isinstance(use_cache, bool):
        raise InvalidInput(f"request parameter 'cache' must be a bool, got {use_cache!r}")
    if not request.model_name:
        raise InvalidInput("model_name is required")
    return InferCall(
        model=request.model_name,
        version=request.model_version,
        inputs=infer_inputs(request),
        outputs=requested_outputs(request),
        priority=priority,
        timeout_s=min(timeouts) if timeouts else None,
        use_cache=use_cache,
        route_key=route_key or request.id,
    )


async def infer_message(gateway: Gateway, request: pb.ModelInferRequest,
                        time_remaining: float | None, key: str = "") -> pb.ModelInferResponse:
    """One ModelInferRequest through the gateway (routing, cache, batcher) to its response:
    the path of ModelInfer, ModelStreamInfer and async tasks alike."""
    outcome: InferOutcome = await gateway.infer(to_call(request, time_remaining, key))
    return infer_response(
        request, outcome.version, outcome.outputs, outcome.cache_hit,
        outcome.queue_ns, outcome.compute_ns, outcome.model,
    )
