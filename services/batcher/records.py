"""Domain records of the batcher: tensors as raw bytes, requests, batches and results.

No grpc, no protobuf: converters in convert.py turn these into meshserve.v1 messages.
A tensor's data is a flat uint8 numpy view of its row-major bytes, so joining rows of
many requests is one np.concatenate and splitting a batch's output is slicing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from meshserve.common.datatypes import datatype
from meshserve.common.errors import Internal, InvalidInput, MeshError


@dataclass(frozen=True, slots=True)
class RawTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # Flat uint8 view over the row-major little-endian bytes.
    data: np.ndarray

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def row_bytes(self) -> int:
        return self.data.size // self.rows if self.rows else 0

    def rows_slice(self, start: int, stop: int) -> RawTensor:
        """Rows [start, stop) as a view (no copy)."""
        per_row = self.row_bytes()
        return RawTensor(
            self.name, self.datatype, (stop - start, *self.shape[1:]),
            self.data[start * per_row : stop * per_row],
        )


def raw_tensor(name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> RawTensor:
    """A tensor over received bytes, checking its size cheaply (the gateway checks the rest)."""
    dt = datatype(dtype)
    if dt.itemsize == 0:
        raise InvalidInput(f"input '{name}': datatype {dtype} cannot be batched")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    expected = dt.itemsize * math.prod(shape)
    if len(data) != expected:
        raise InvalidInput(
            f"input '{name}': {len(data)} bytes of raw data, expected {expected} "
            f"for {dtype} of shape {list(shape)}"
        )
    return RawTensor(name, dtype, tuple(shape), np.frombuffer(data, dtype=np.uint8))


def join_rows(parts: list[RawTensor]) -> RawTensor:
    """One tensor holding every part's rows, in order (one np.concatenate)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    inner = first.shape[1:]
    for p in parts:
        if p.shape[1:] != inner or p.datatype != first.datatype:
            # The queue batches by shape key; reaching this is a bug, never a mixed batch.
            raise Internal(
                f"input '{first.name}': cannot join {first.datatype} {list(first.shape)} "
                f"and {p.datatype} {list(p.shape)} into one batch")
    rows = sum(p.rows for p in parts)
    data = np.concatenate([p.data for p in parts])
    return RawTensor(first.name, first.datatype, (rows, *first.shape[1:]), data)


def tensor_bytes(t: RawTensor) -> bytes:
    """The tensor's bytes: the received bytes object itself when the tensor is all of it
    (no copy), else a copy."""
    base = t.data.base
    if type(base) is bytes and len(base) == t.data.nbytes:
        return base
    return t.data.tobytes()


@dataclass(frozen=True, slots=True)
class BatchOutputs:
    """A batch's outputs, shared by the results of its requests (each knows its rows)."""

    tensors: tuple[RawTensor, ...]
    batched: bool  # dimension 0 counts rows; False: one request, whose outputs they are


class InferResult:
    """The answer to one request: outputs, or a non-zero status code and message.
    A request of a batch refers to the batch's outputs (shared) and its rows in them,
    so answering a batch makes no tensor per request; `outputs` slices them on demand."""

    __slots__ = ("request_id", "error", "_outputs", "queue_ns", "compute_ns", "batch_size",
                 "shared", "row", "rows", "names")

    def __init__(self, request_id: int, error: MeshError | None = None,
                 outputs: tuple[RawTensor, ...] = (), queue_ns: int = 0, compute_ns: int = 0,
                 batch_size: int = 0, shared: BatchOutputs | None = None, row: int = 0,
                 rows: int = 0, names: tuple[str, ...] = ()):
        self.request_id = request_id
        self.error = error  # None: OK, outputs set
        self._outputs = outputs
        self.queue_ns, self.compute_ns, self.batch_size = queue_ns, compute_ns, batch_size
        self.shared = shared
        self.row, self.rows = row, rows  # the request's rows in shared's tensors
        self.names = names  # the outputs the request asked for; empty: every output

    @property
    def outputs(self) -> tuple[RawTensor, ...]:
        shared = self.shared
        if shared is None:
            return self._outputs
        return tuple(
            (t.rows_slice(self.row, self.row + self.rows) if shared.batched else t)
            for t in shared.tensors if not self.names or t.name in self.names)


@dataclass(eq=False, slots=True)
class Request:
    """One queued request. Carries its own future; a result is set only once."""

    request_id: int
    model: str
    version: str
    inputs: tuple[RawTensor, ...]
    outputs: tuple[str, ...]
    rows: int
    level: int  # 1 is the highest priority level
    enqueued_s: float
    deadline_s: float | None  # monotonic; None: no deadline
    future: asyncio.Future = field(repr=False)
    seq: int = 0
    cancelled: bool = False
    withdrawn: bool = False  # the caller needs it no more (not a failure)
    traceparent: str = ""  # W3C trace context of the request ("" if none)
    # Called with the request and its result when it is answered (before the future's
    # callbacks run): a session's outbox, without a callback scheduled per request.
    on_result: Callable[[Request, InferResult], None] | None = None

    @property
    def done(self) -> bool:
        return self.cancelled or self.future.done()


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests closed into one model execution; inputs joined on dimension 0."""

    batch_id: int
    model: str
    version: str
    requests: tuple[Request, ...]
    inputs: tuple[RawTensor, ...]
    outputs: tuple[str, ...]
    rows: int
    closed_s: float


@dataclass(frozen=True, slots=True)
class BatchReply:
    """What a worker answered for one batch."""

    error: MeshError | None  # None: OK
    outputs: tuple[RawTensor, ...]
    compute_ns: int
    executed_batch_size: int
