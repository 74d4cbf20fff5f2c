"""Converters between the batcher's records and meshserve.v1 messages (pure, symmetric)."""

from __future__ import annotations

from meshserve.batcher.records import (
    Batch,
    BatchReply,
    InferResult,
    RawTensor,
    raw_tensor,
    tensor_bytes,
)
from meshserve.batcher.stats import ModelStats
from meshserve.batcher.workers import HeldModel, WorkerReport
from meshserve.common import grpcutil
from meshserve.pb.meshserve.v1 import batcher_pb2, tensor_pb2, worker_pb2


def tensor_from_pb(t: tensor_pb2.Tensor) -> RawTensor:
    return raw_tensor(t.name, t.datatype, tuple(t.shape), t.data)


def tensor_to_pb(t: RawTensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=t.name, datatype=t.datatype, shape=list(t.shape),
                             data=t.data.tobytes())


def batch_to_pb(batch: Batch) -> worker_pb2.Batch:
    return worker_pb2.Batch(
        batch_id=batch.batch_id, model=batch.model, version=batch.version,
        inputs=[tensor_to_pb(t) for t in batch.inputs], outputs=list(batch.outputs),
        traceparents=_traceparents(batch),
    )


def _traceparents(batch: Batch) -> list[str]:
    """One per request, in order; none at all when no request carries one."""
    found = [r.traceparent for r in batch.requests]
    return found if any(found) else []


def outcome_from_pb(r: worker_pb2.BatchResult) -> BatchReply:
    if r.code != 0:
        return BatchReply(grpcutil.error_from_code(r.code, r.message), (), r.compute_ns,
                            r.executed_batch_size)
    return BatchReply(None, tuple(tensor_from_pb(t) for t in r.outputs), r.compute_ns,
                        r.executed_batch_size)


def result_to_pb(r: InferResult) -> batcher_pb2.InferResult:
    if r.error is not None:
        return batcher_pb2.InferResult(
            request_id=r.request_id, code=grpcutil.code_value(r.error), message=str(r.error),
            queue_ns=r.queue_ns, batch_size=r.batch_size,
        )
    return batcher_pb2.InferResult(
        request_id=r.request_id, outputs=[tensor_to_pb(t) for t in r.outputs],
        queue_ns=r.queue_ns, compute_ns=r.compute_ns, batch_size=r.batch_size,
    )


def results_to_pb(results: list[InferResult], received: int, blocks: bool
                  ) -> batcher_pb2.InferResults:
    """One message for a session's drained results. With blocks, the successes of each
    batch travel as one ResultBlock (their rows joined, one Tensor per output); failures,
    and everything without blocks, as one InferResult each."""
    message = batcher_pb2.InferResults(received=received)
    by_batch: dict[int, list[InferResult]] = {}
    for r in results:
        if blocks and r.shared is not None and r.error is None:
            by_batch.setdefault(id(r.shared), []).append(r)
        else:
            message.results.append(result_to_pb(r))
    for group in by_batch.values():
        if group[0].shared.batched:
            _block(message.blocks.add(), group)
        else:  # a model that does not batch: a batch is one request (else one result each)
            for r in group:
                _whole_block(message.blocks.add(), r)
    return message


def _whole_block(block: batcher_pb2.ResultBlock, r: InferResult) -> None:
    block.request_ids.append(r.request_id)
    block.queue_ns.append(r.queue_ns)
    block.compute_ns, block.batch_size = r.compute_ns, r.batch_size
    add = block.outputs.add
    for t in r.outputs:
        add(name=t.name, datatype=t.datatype, shape=t.shape, data=tensor_bytes(t))


def _block(block: batcher_pb2.ResultBlock, group: list[InferResult]) -> None:
    """Requests of one batch (some of its requests may be another stream's, cancelled or
    withdrawn): their rows of every output any of them asked for, joined in one Tensor
    per output; one slice per run of consecutive rows (usually the whole batch: no copy)."""
    group.sort(key=_row)
    first = group[0]
    block.request_ids.extend([r.request_id for r in group])
    block.rows.extend([r.rows for r in group])
    block.queue_ns.extend([r.queue_ns for r in group])
    block.compute_ns, block.batch_size = first.compute_ns, first.batch_size
    runs: list[list[int]] = []
    for r in group:
        if runs and runs[-1][1] == r.row:
            runs[-1][1] += r.rows
        else:
            runs.append([r.row, r.row + r.rows])
    names: set[str] | None = set()
    for r in group:
        if not r.names:
            names = None  # one asks for every output
            break
        names.update(r.names)
    rows = sum(stop - start for start, stop in runs)
    add = block.outputs.add
    for t in first.shared.tensors:
        if names is not None and t.name not in names:
            continue
        if len(runs) == 1 and runs[0] == [0, t.rows]:
            data = tensor_bytes(t)
        else:
            per_row = t.row_bytes()
            data = b"".join([t.data[start * per_row:stop * per_row] for start, stop in runs])
        add(name=t.name, datatype=t.datatype, shape=(rows, *t.shape[1:]), data=data)


def _row(r: InferResult) -> int:
    return r.row


def report_from_pb(s: worker_pb2.WorkerStatus) -> WorkerReport:
    return WorkerReport(
        worker_id=s.worker_id, device=s.device,
        models=tuple(HeldModel(m.model, m.version, m.state, m.byte_size, tuple(m.graph_buckets),
                                tuple((b.batch_size, b.reason) for b in m.eager_buckets))
                      for m in s.models),
        memory_used_bytes=s.memory_used_bytes, memory_limit_bytes=s.memory_limit_bytes,
        max_models=s.max_models, in_flight=s.in_flight, draining=s.draining,
    )


def stats_to_pb(s: ModelStats) -> batcher_pb2.ModelStats:
    d = batcher_pb2.Duration
    return batcher_pb2.ModelStats(
        model=s.model, version=s.version, last_inference_ms=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        success=d(count=s.success.count, ns=s.success.ns),
        fail=d(count=s.fail.count, ns=s.fail.ns),
        queue=d(count=s.queue.count, ns=s.queue.ns),
        compute_infer=d(count=s.compute_infer.count, ns=s.compute_infer.ns),
        batch_stats=[
            batcher_pb2.BatchSizeStats(batch_size=size, compute_infer=d(count=v.count, ns=v.ns))
            for size, v in sorted(s.batch_stats.items())
        ],
    )


def states_to_pb(states) -> batcher_pb2.ModelStatesResponse:
    return batcher_pb2.ModelStatesResponse(versions=[
        batcher_pb2.ModelVersionState(model=s.model, version=s.version, state=s.state,
                                      reason=s.reason, workers=list(s.workers),
                                      graph_buckets=s.graph_buckets,
                                      eager_buckets=s.eager_buckets)
        for s in states
    ])
