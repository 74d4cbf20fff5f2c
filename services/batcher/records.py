"""Domain records of the batcher: tensors as raw bytes, requests, batches and results.

No grpc, no protobuf: converters in convert.py turn these into meshserve.v1 messages.
A tensor's data is a flat uint8 numpy view of its row-major bytes, so joining rows of
many requests is one np.concatenate and splitting a batch's output is slicing.
"""

from __future__ import annotations

import asyncio
import math
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


@dataclass(frozen=True, slots=True)
class InferResult:
    """The answer to one request: outputs, or a non-zero status code and message."""

    request_id: int
    error: MeshError | None = None  # None: OK, outputs set
    outputs: tuple[RawTensor, ...] = ()
    queue_ns: int = 0
    compute_ns: int = 0
    batch_size: int = 0


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
