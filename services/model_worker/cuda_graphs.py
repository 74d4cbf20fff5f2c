"""Runs a model's forward on fixed batch-size buckets.

On CUDA (when enabled) each bucket is one CUDA graph captured on a side stream into
static input/output buffers and its own memory pool. A batch of n rows is copied into
the static input of the smallest bucket >= n (rows past n zeroed), the graph replayed,
and the outputs' first n rows copied to pinned host buffers. Batches larger than the
largest bucket run eagerly; so does a bucket whose capture failed (logged, and listed
in `eager_buckets`), on its static buffers.

Concurrency: a worker runs several batches at once (--max-in-flight). A graph's
intermediates live in its pool and are overwritten by every replay, so two replays may
never share a pool. One pool per bucket, with the bucket's lock held from filling its
inputs to copying its outputs out, lets batches of different buckets run at once while
two batches of one bucket take turns. The alternative, one pool for the model and one
lock around every replay of it, saves the pools' memory (the sum of the buckets'
intermediates instead of the largest: under 2x with power-of-two buckets) but runs one
batch of a model at a time, so a single-model worker loses the overlap --max-in-flight
exists for. bench/graph_locks.py measures both locking rules on this code.

The same static-buffer path runs on CPU with `use_graphs=False` (the forward is called
on the static inputs instead of replaying a graph), which is how the bucket choice,
padding, slicing and buffer reuse are tested without a GPU.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    # Dimensions of one row; -1 accepts any size (such models cannot use static buffers).
    dims: tuple[int, ...]


def choose_bucket(buckets: Sequence[int], rows: int) -> int | None:
    """The smallest bucket >= rows, or None when rows exceed every bucket."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


def zero_inputs(specs: Sequence[InputSpec], rows: int, device: torch.device | str):
    """Zero inputs of `rows` rows; -1 dims become 1."""
    return [
        torch.zeros((rows, *(1 if d == -1 else d for d in s.dims)), dtype=s.dtype, device=device)
        for s in specs
    ]


@dataclass(slots=True)
class _Bucket:
    size: int
    inputs: list[torch.Tensor]  # static, on the device
    outputs: list[torch.Tensor] = field(default_factory=list)  # graph outputs (CUDA)
    host: list[torch.Tensor] = field(default_factory=list)  # host outputs (pinned on CUDA)
    graph: torch.cuda.CUDAGraph | None = None
    stream: torch.cuda.Stream | None = None
    pool: object = None  # the graph's private memory pool (CUDA)
    eager_reason: str = ""  # why a bucket meant for a graph runs eagerly
    # One batch at a time per bucket: its static buffers and its pool are shared.
    lock: threading.Lock = field(default_factory=threading.Lock)


class BucketRunner:
    """Runs `forward` (inputs -> tuple of outputs) on a device; thread-safe.

    static_buffers: copy batches into per-bucket static inputs (padding to the bucket);
    use_graphs: additionally capture and replay one CUDA graph per bucket (CUDA only).
    Without static buffers every batch runs eagerly at its own size.
    """

    def __init__(
        self,
        forward: Forward,
        inputs: Sequence[InputSpec],
        buckets: Sequence[int],
        device: torch.device | str,
        *,
        static_buffers: bool,
        use_graphs: bool = False,
        graph_warmup_iters: int = 3,
    ):
        self.forward = forward
        self.specs = tuple(inputs)
        self.buckets = tuple(sorted(set(buckets)))
        self.device = torch.device(device)
        fixed = all(d != -1 for s in self.specs for d in s.dims)
        self.use_graphs = use_graphs and self.device.type == "cuda" and fixed
        self.static = (static_buffers or self.use_graphs) and fixed and bool(self.buckets)
        self.graph_warmup_iters = graph_warmup_iters
        self._buckets: dict[int, _Bucket] = {}
        self._prepare_lock = threading.Lock()

    # ------------------------------------------------------------------ warmup / capture

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        """Buckets that replay a CUDA graph."""
        return tuple(sorted(s for s, b in self._buckets.items() if b.graph is not None))

    @property
    def eager_buckets(self) -> dict[int, str]:
        """Buckets meant for a graph whose capture failed: {size: reason}."""
        return {s: b.eager_reason for s, b in sorted(self._buckets.items()) if b.eager_reason}

    def warmup(self) -> list[tuple[int, int]]:
        """Runs (and on CUDA captures) every bucket with zero inputs.
        Returns [(bucket, ns)] ascending."""
        timings = []
        with torch.inference_mode():
            for size in sorted(self.buckets):
                start = time.perf_counter_ns()
                if self.static:
                    self._prepare(size)
                self.run(zero_inputs(self.specs, size, "cpu"))
                timings.append((size, time.perf_counter_ns() - start))
        return sorted(timings)

    def _prepare(self, size: int) -> _Bucket:
        bucket = self._buckets.get(size)
        if bucket is not None:
            return bucket
        with self._prepare_lock:
            if size not in self._buckets:
                bucket = _Bucket(size, zero_inputs(self.specs, size, self.device))
                if self.use_graphs:
                    try:
                        self._capture(bucket)
                    except Exception as e:  # noqa: BLE001 - this bucket then runs eagerly
                        bucket.graph = bucket.stream = bucket.pool = None
                        bucket.outputs, bucket.host = [], []
                        bucket.eager_reason = f"capture failed: {type(e).__name__}: {e}"[:300]
                        log.warning("batch size %d runs eagerly: %s", size, bucket.eager_reason)
                self._buckets[size] = bucket
            return self._buckets[size]

    def _capture(self, bucket: _Bucket) -> None:
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm up on the side stream before capture
                for _ in range(self.graph_warmup_iters):
                    self.forward(*bucket.inputs)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()  # this bucket's own: see the module doc
            with torch.cuda.graph(graph, pool=pool, stream=stream,
                                  capture_error_mode="thread_local"):
                outputs = self.forward(*bucket.inputs)
            bucket.graph, bucket.stream, bucket.pool = graph, stream, pool
            bucket.outputs = list(outputs)
            bucket.host = [
                torch.empty(o.shape, dtype=o.dtype, device="cpu", pin_memory=True)
                for o in outputs
            ]

    # ------------------------------------------------------------------------- running

    def bucket_for(self, rows: int) -> int | None:
        """The bucket a batch of `rows` runs in, None when it runs eagerly."""
        return choose_bucket(self.buckets, rows) if self.static else None

    def static_inputs(self, size: int) -> list[torch.Tensor]:
        """The static input buffers of a bucket (created on first use)."""
        return self._prepare(size).inputs

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], int]:
        """(outputs on the CPU with exactly the batch's rows, executed batch size)."""
        rows = inputs[0].shape[0] if inputs[0].dim() else 1
        size = self.bucket_for(rows)
        with torch.inference_mode():
            if size is None:
                device_inputs = [x.to(self.device, non_blocking=True) for x in inputs]
                outputs = self.forward(*device_inputs)
                return tuple(o.to("cpu") for o in outputs), rows
            bucket = self._prepare(size)
            with bucket.lock:
                if bucket.graph is not None:
                    self._replay(bucket, inputs, rows)
                else:
                    self._fill(bucket, inputs, rows)
                    outputs = self.forward(*bucket.inputs)
                    if not bucket.host:
                        bucket.host = [torch.empty_like(o, device="cpu") for o in outputs]
                    for host, out in zip(bucket.host, outputs, strict=True):
                        host.copy_(out)
                # The host buffers are reused by the next batch of this bucket.
                return tuple(h[:rows].clone() for h in bucket.host), size

    @staticmethod
    def _fill(bucket: _Bucket, inputs: Sequence[torch.Tensor], rows: int) -> None:
        for static, x in zip(bucket.inputs, inputs, strict=True):
            static[:rows].copy_(x, non_blocking=True)
            static[rows:].zero_()

    def _replay(self, bucket: _Bucket, inputs: Sequence[torch.Tensor], rows: int) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(bucket.stream):
            self._fill(bucket, inputs, rows)
            bucket.graph.replay()
            for host, out in zip(bucket.host, bucket.outputs, strict=True):
                host[:rows].copy_(out[:rows], non_blocking=True)
            bucket.stream.synchronize()
