"""Pure converters between meshserve.v1 worker messages and the worker's domain records."""

from __future__ import annotations

from meshserve.model_worker.execution import BatchOutcome, BatchRequest, WireTensor
from meshserve.model_worker.models import ModelInfo
from meshserve.model_worker.worker import WorkerState
from meshserve.pb.meshserve.v1 import tensor_pb2, worker_pb2


def tensor_from_pb(t: tensor_pb2.Tensor) -> WireTensor:
    return WireTensor(t.name, t.datatype, tuple(t.shape), t.data)


def tensor_to_pb(t: WireTensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=t.name, datatype=t.datatype, shape=t.shape, data=t.data)


def batch_from_pb(b: worker_pb2.Batch) -> BatchRequest:
    return BatchRequest(
        batch_id=b.batch_id, model=b.model, version=b.version,
        inputs=tuple(tensor_from_pb(t) for t in b.inputs), outputs=tuple(b.outputs),
        traceparents=tuple(b.traceparents),
    )


def batch_to_pb(b: BatchRequest) -> worker_pb2.Batch:
    return worker_pb2.Batch(
        batch_id=b.batch_id, model=b.model, version=b.version,
        inputs=[tensor_to_pb(t) for t in b.inputs], outputs=list(b.outputs),
        traceparents=list(b.traceparents),
    )


def outcome_to_pb(o: BatchOutcome) -> worker_pb2.BatchResult:
    return worker_pb2.BatchResult(
        batch_id=o.batch_id, code=o.code, message=o.message,
        outputs=[tensor_to_pb(t) for t in o.outputs], compute_ns=o.compute_ns,
        executed_batch_size=o.executed_batch_size,
    )


def model_to_pb(m: ModelInfo) -> worker_pb2.LoadedModel:
    return worker_pb2.LoadedModel(
        model=m.model, version=m.version, state=m.state, byte_size=m.byte_size,
        warmup=[worker_pb2.BucketWarmup(batch_size=b, warmup_ns=ns) for b, ns in m.warmup],
        cuda_graphs=m.cuda_graphs, load_ns=m.load_ns, format=m.format, precision=m.precision,
        compile_mode=m.compile_mode, compiled=m.compiled, compile_ns=m.compile_ns,
        compile_error=m.compile_error,
        graph_buckets=m.graph_buckets,
        eager_buckets=[worker_pb2.EagerBucket(batch_size=b, reason=r) for b, r in m.eager_buckets],
    )


def status_to_pb(s: WorkerState) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(
        worker_id=s.worker_id, device=s.device, models=[model_to_pb(m) for m in s.models],
        memory_used_bytes=s.memory_used_bytes, memory_limit_bytes=s.memory_limit_bytes,
        max_models=s.max_models, in_flight=s.in_flight, draining=s.draining,
    )
