"""BatcherClient: what a gateway uses to reach the batcher.

Every caller is multiplexed over one long-lived Infer stream (or a few, for several
batcher replicas): requests submitted while a send is pending go out together in one
InferRequests message, results are routed back to callers by request_id. A broken stream
fails its in-flight calls with Unavailable (never hangs); the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import grpc

from meshserve.common import grpcutil
from meshserve.common.errors import DeadlineExceeded, MeshError, Unavailable
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)


class _Stream:
    """One Infer stream: an outgoing queue drained whole per message, and pending futures."""

    def __init__(self, stub: batcher_pb2_grpc.BatcherStub, target: str):
        self.target = target
        self.pending: dict[int, asyncio.Future] = {}
        self._requests: list[batcher_pb2.InferRequest] = []
        self._cancelled: list[int] = []
        self._wake = asyncio.Event()
        self.alive = True
        self._call = stub.Infer(self._outgoing())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, request: batcher_pb2.InferRequest, future: asyncio.Future) -> None:
        self.pending[request.request_id] = future
        self._requests.append(request)
        self._wake.set()

    def cancel(self, request_id: int) -> None:
        if self.pending.pop(request_id, None) is not None and self.alive:
            self._cancelled.append(request_id)
            self._wake.set()

    async def _outgoing(self):
        while True:
            while not self._requests and not self._cancelled:
                self._wake.clear()
                await self._wake.wait()
            message = batcher_pb2.InferRequests(requests=self._requests, cancelled=self._cancelled)
            self._requests, self._cancelled = [], []
            yield message

    async def _read(self) -> None:
        error: MeshError = Unavailable(f"the batcher at {self.target} closed the stream")
        try:
            async for message in self._call:
                for r in message.results:
                    future = self.pending.pop(r.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(r)
        except grpc.aio.AioRpcError as e:
            error = grpcutil.error_from_rpc(e, f"the batcher at {self.target}")
            if not isinstance(error, Unavailable):
                error = Unavailable(f"the batcher at {self.target} failed the stream: {error}")
        except asyncio.CancelledError:
            error = Unavailable("the batcher client is closed")
            raise
        finally:
            self.alive = False
            pending, self.pending = self.pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self.alive = False
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class BatcherClient:
    def __init__(self, target: str, streams: int = 1):
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: batcher_pb2_grpc.BatcherStub | None = None
        self._streams: list[_Stream | None] = [None] * streams
        self._next_stream = itertools.count()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self._channel = grpcutil.insecure_channel(self.target)
        self._stub = batcher_pb2_grpc.BatcherStub(self._channel)

    async def close(self) -> None:
        for i, stream in enumerate(self._streams):
            if stream is not None:
                await stream.close()
            self._streams[i] = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _stream(self) -> _Stream:
        if self._stub is None:
            raise Unavailable("the batcher client is not started")
        i = next(self._next_stream) % len(self._streams)
        stream = self._streams[i]
        if stream is None or not stream.alive:
            stream = self._streams[i] = _Stream(self._stub, self.target)
        return stream

    async def infer(self, model: str, version: str, inputs: list[tensor_pb2.Tensor],
                    outputs: list[str], priority: int = 0,
                    timeout_s: float | None = None) -> batcher_pb2.InferResult:
        """One request through the shared stream; raises the domain error of its result."""
        request_id = next(self._ids)
        request = batcher_pb2.InferRequest(
            request_id=request_id, model=model, version=version, inputs=inputs,
            outputs=outputs, priority=priority,
            timeout_us=int(timeout_s * 1e6) if timeout_s else 0,
        )
        stream = self._stream()
        future = asyncio.get_running_loop().create_future()
        stream.send(request, future)
        try:
            if timeout_s:
                # The batcher answers DEADLINE_EXCEEDED itself; this only bounds a stuck hop.
                result = await asyncio.wait_for(asyncio.shield(future), timeout_s + 1.0)
            else:
                result = await future
        except TimeoutError:
            stream.cancel(request_id)
            raise DeadlineExceeded(
                f"no answer from the batcher within {timeout_s:.3f}s") from None
        except asyncio.CancelledError:
            stream.cancel(request_id)
            raise
        if result.code != 0:
            raise grpcutil.error_from_code(result.code, result.message)
        return result

    async def _unary(self, method: str, request):
        if self._stub is None:
            raise Unavailable("the batcher client is not started")
        try:
            return await getattr(self._stub, method)(request)
        except grpc.aio.AioRpcError as e:
            raise grpcutil.error_from_rpc(e, f"the batcher at {self.target}") from None

    async def statistics(self, model: str = "", version: str = "") -> batcher_pb2.StatisticsResponse:
        return await self._unary(
            "Statistics", batcher_pb2.StatisticsRequest(model=model, version=version))

    async def load_model(self, model: str, versions: list[str] | None = None
                         ) -> batcher_pb2.ModelStatesResponse:
        return await self._unary(
            "LoadModel", batcher_pb2.LoadModelRequest(model=model, versions=versions or []))

    async def unload_model(self, model: str, versions: list[str] | None = None
                           ) -> batcher_pb2.ModelStatesResponse:
        return await self._unary(
            "UnloadModel", batcher_pb2.UnloadModelRequest(model=model, versions=versions or []))

    async def model_states(self, model: str = "") -> batcher_pb2.ModelStatesResponse:
        return await self._unary("ModelStates", batcher_pb2.ModelStatesRequest(model=model))
