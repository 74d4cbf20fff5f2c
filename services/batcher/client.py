"""BatcherClient: what a gateway uses to reach the batcher.

Every caller is multiplexed over one long-lived Infer stream (or a few, for several
batcher replicas): requests submitted while a send is pending go out together in one
InferRequests message, results are routed back to callers by request_id. A broken stream
fails its in-flight calls with Unavailable (never hangs); the next call opens a new one.
A call whose stream broke (its batcher went away, e.g. a restart) goes once more when a
batcher answers on that channel again, within `rejoin_wait_s` and its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from meshserve.batcher.core import DRAINING
from meshserve.common import grpcutil, tracing
from meshserve.common.errors import DeadlineExceeded, MeshError, Unavailable
from meshserve.common.hops import HopCount
from meshserve.common.transport import Transport
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc

log = logging.getLogger(__name__)

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


# InferRequests messages sent and not yet acknowledged (InferResults.received) before the
# next waits: holding it lets the requests that arrive meanwhile travel together.
MAX_UNACKED_MESSAGES = 1


class _Stream:
    """One Infer stream: an outgoing queue drained whole per message, and pending futures.
    Flow control: once the batcher has acknowledged a message (so it is known to), the
    next waits while MAX_UNACKED_MESSAGES are unacknowledged."""

    def __init__(self, stub: batcher_pb2_grpc.BatcherStub, target: str,
                 sent: HopCount, received: HopCount, channel: int = 0):
        self.target, self.channel = target, channel
        self.sent, self.received = sent, received  # requests out, results back
        self.pending: dict[int, asyncio.Future] = {}
        # The next message, its requests built in place (see add): no copy of them.
        self._message = batcher_pb2.InferRequests(result_blocks=True)
        self._cancelled: list[int] = []
        self._withdrawn: list[int] = []
        self._wake = asyncio.Event()
        self.alive = True
        self.heard_at: float | None = None  # loop time of the batcher's last message
        # Its batcher refused a request as draining: send nothing new on it.
        self.draining = False
        self._unacked = 0
        self._acks_seen = False  # an older batcher never acknowledges: no flow control
        self._call = stub.Infer(self._outgoing())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def add(self, request_id: int, future: asyncio.Future, model: str, version: str,
            inputs, outputs: list[str], priority: int, timeout_us: int,
            traceparent: str) -> batcher_pb2.InferRequest:
        """A request built straight into the next message: each input's bytes are copied
        once, into it (no Tensor or InferRequest of its own to copy again)."""
        request = self._message.requests.add(
            request_id=request_id, model=model, version=version, outputs=outputs,
            priority=priority, timeout_us=timeout_us, traceparent=traceparent)
        add = request.inputs.add
        for t in inputs:
            add(name=t.name, datatype=t.datatype, shape=t.shape, data=t.data)
        self.pending[request_id] = future
        self._wake.set()
        return request

    def resend(self, request_id: int, future: asyncio.Future,
               request: batcher_pb2.InferRequest) -> batcher_pb2.InferRequest:
        """A request another stream's batcher refused, sent again on this one."""
        copy = self._message.requests.add()
        copy.CopyFrom(request)
        copy.request_id = request_id
        self.pending[request_id] = future
        self._wake.set()
        return copy

    def cancel(self, request_id: int, withdrawn: bool = False) -> None:
        if self.pending.pop(request_id, None) is not None and self.alive:
            (self._withdrawn if withdrawn else self._cancelled).append(request_id)
            self._wake.set()

    async def _outgoing(self):
        while True:
            while (not self._message.requests and not self._cancelled
                   and not self._withdrawn) or (
                    self._acks_seen and self._unacked >= MAX_UNACKED_MESSAGES):
                self._wake.clear()
                await self._wake.wait()
            message = self._message
            message.cancelled.extend(self._cancelled)
            message.withdrawn.extend(self._withdrawn)
            self.sent.add(len(message.requests))
            self._unacked += 1
            self._message = batcher_pb2.InferRequests(result_blocks=True)
            self._cancelled, self._withdrawn = [], []
            yield message

    async def _read(self) -> None:
        error: MeshError = Unavailable(f"the batcher at {self.target} closed the stream")
        try:
            loop = asyncio.get_running_loop()
            async for message in self._call:
                self.heard_at = loop.time()
                self.received.add(len(message.results)
                                  + sum(len(b.request_ids) for b in message.blocks))
                if message.received:
                    self._acks_seen = True
                    self._unacked = max(0, self._unacked - message.received)
                    self._wake.set()
                pending = self.pending
                for r in message.results:
                    future = pending.pop(r.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(r)
                for b in message.blocks:
                    deliver_block(b, pending, self.target)
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
    """target: one address, a gRPC URI (dns:///name:port, ipv4:a:1,b:2: one channel,
    round_robin), or a comma list of addresses (one channel each). Requests go round-robin
    over `streams` streams per channel, skipping channels in TRANSIENT_FAILURE."""

    def __init__(self, target: str, streams: int = 1, transport: Transport | None = None,
                 rejoin_wait_s: float = 10.0):
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.target = target
        self.transport = transport
        self.rejoin_wait_s = rejoin_wait_s
        self._heard_at: dict[int, float] = {}  # channel -> when a batcher there last spoke
        self._closing: asyncio.Event | None = None  # set by close(): no more rejoining
        self.targets = grpcutil.split_targets(target)
        if not self.targets:
            raise ValueError("the batcher target is empty")
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[batcher_pb2_grpc.BatcherStub] = []
        self._streams: list[_Stream | None] = [None] * (streams * len(self.targets))
        self._retired: set[_Stream] = set()  # draining: still answering what they hold
        self._next_stream = itertools.count()
        self._next_unary = itertools.count()
        self._ids = itertools.count(1)
        self._each_channels: dict[str, grpc.aio.Channel] = {}  # address -> channel (each())
        self._loop: asyncio.AbstractEventLoop | None = None  # start()'s
        self.sent, self.received = HopCount(), HopCount()

    def hop_counts(self) -> list[tuple[str, HopCount]]:
        return [("gateway->batcher", self.sent), ("batcher->gateway", self.received)]

    async def start(self) -> None:
        # Kept: asyncio.get_running_loop() makes a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._channels = [grpcutil.channel(t, self.transport) for t in self.targets]
        self._stubs = [batcher_pb2_grpc.BatcherStub(c) for c in self._channels]

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        for i, stream in enumerate(self._streams):
            if stream is not None:
                await stream.close()
            self._streams[i] = None
        for stream in self._retired:
            await stream.close()
        self._retired.clear()
        for channel in [*self._channels, *self._each_channels.values()]:
            await channel.close()
        self._channels, self._stubs, self._each_channels = [], [], {}

    def _usable(self, channel_index: int) -> bool:
        state = self._channels[channel_index].get_state(try_to_connect=True)
        return state != grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def _stream(self) -> _Stream:
        if not self._stubs:
            raise Unavailable("the batcher client is not started")
        n = len(self._streams)
        start = next(self._next_stream)
        i = start % n
        if len(self._channels) > 1:
            # The next stream whose batcher is not known to be down (else the next one).
            for k in range(n):
                j = (start + k) % n
                if self._usable(j % len(self._channels)):
                    i = j
                    break
        stream = self._streams[i]
        if stream is None or not stream.alive or stream.draining:
            if stream is not None and stream.alive:
                self._retired.add(stream)
            self._retired = {s for s in self._retired if s.alive}
            c = i % len(self._channels)
            if stream is not None and stream.heard_at is not None:
                self._heard_at[c] = max(self._heard_at.get(c, stream.heard_at), stream.heard_at)
            stream = self._streams[i] = _Stream(self._stubs[c], self.targets[c], self.sent,
                                                self.received, c)
        return stream

    async def infer(self, model: str, version: str, inputs, outputs: list[str],
                    priority: int = 0, timeout_s: float | None = None
                    ) -> batcher_pb2.InferResult:
        """One request through a shared stream; raises the domain error of its result.
        A request a draining batcher refused (never queued) goes out again on another
        stream, which the channel opens to another batcher."""
        return await self.result(self.send(model, version, inputs, outputs, priority,
                                           timeout_s))

    def send(self, model: str, version: str, inputs, outputs: list[str], priority: int = 0,
             timeout_s: float | None = None) -> Sent:
        """Sends a request now; `await result(sent)` for its result, or `cancel(sent)`.
        inputs: tensors with name, datatype, shape and data (bytes), e.g. the gateway's
        WireTensor records or meshserve.v1 Tensors."""
        stream = self._stream()
        future = self._loop.create_future()
        request = stream.add(
            next(self._ids), future, model, version, inputs, outputs, priority,
            max(1, int(timeout_s * 1e6)) if timeout_s else 0,
            tracing.current_traceparent())  # the caller's trace context
        return self._sent(request, timeout_s, stream, future)

    def _sent(self, request: batcher_pb2.InferRequest, timeout_s: float | None,
              stream: _Stream, future: asyncio.Future) -> Sent:
        # The batcher answers DEADLINE_EXCEEDED itself; this timer only bounds a stuck hop
        # (a timer on the future costs less than wait_for's extra task per request).
        timer = (self._loop.call_later(timeout_s + 1.0, _expire, future, timeout_s)
                 if timeout_s else None)
        return Sent(request, timeout_s, stream, future, timer)

    def _resend(self, sent: Sent) -> Sent:
        stream = self._stream()
        future = self._loop.create_future()
        request = stream.resend(next(self._ids), future, sent.request)
        return self._sent(request, sent.timeout_s, stream, future)

    def cancel(self, sent: Sent) -> None:
        """The caller no longer needs the result: the batcher drops the request (not
        counted as a failure)."""
        if sent.timer is not None:
            sent.timer.cancel()
        if not sent.future.done():
            sent.future.cancel()
        sent.stream.cancel(sent.request.request_id, withdrawn=True)

    async def result(self, sent: Sent) -> batcher_pb2.InferResult:
        retries = len(self._streams)
        rejoined = False
        while True:
            try:
                result = await sent.future
            except (DeadlineExceeded, asyncio.CancelledError):
                sent.stream.cancel(sent.request.request_id)
                raise
            except Unavailable:
                # Its stream broke with it (the batcher went away: no answer can come from
                # there). Once, it goes again when a batcher answers on the channel.
                if rejoined or not await self._rejoin(sent):
                    raise
                rejoined = True
                sent = self._resend(sent)
                continue
            finally:
                if sent.timer is not None:
                    sent.timer.cancel()
            if (result.code == _UNAVAILABLE and result.message.startswith(DRAINING)
                    and retries > 0):
                sent.stream.draining = True
                retries -= 1
                sent = self._resend(sent)
                continue
            if result.code != 0:
                raise grpcutil.error_from_code(result.code, result.message)
            return result

    async def _rejoin(self, sent: Sent) -> bool:
        """Waits, up to rejoin_wait_s and the request's timeout, for the stream's channel
        to connect again (a restarted batcher); False when it did not, when no batcher spoke
        on that channel within rejoin_wait_s (it is down, not restarting), or we are closed."""
        wait = min(self.rejoin_wait_s, sent.timeout_s or self.rejoin_wait_s)
        if wait <= 0 or not self._channels or self._closing.is_set():
            return False
        c = sent.stream.channel % len(self._channels)
        heard = max(self._heard_at.get(c, -1e18), sent.stream.heard_at or -1e18)
        self._heard_at[c] = heard
        if self._loop.time() - heard > self.rejoin_wait_s:
            return False  # no batcher answered there lately: not a restart, fail at once
        channel = self._channels[c]
        ready = asyncio.ensure_future(channel.channel_ready())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((ready, closing), timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closing.cancel()
        return (ready.done() and not ready.cancelled() and ready.exception() is None
                and not self._closing.is_set())

    async def _unary(self, method: str, request, channel_index: int | None = None):
        if not self._stubs:
            raise Unavailable("the batcher client is not started")
        c = next(self._next_unary) if channel_index is None else channel_index
        c %= len(self._stubs)
        try:
            return await getattr(self._stubs[c], method)(request)
        except grpc.aio.AioRpcError as e:
            raise grpcutil.error_from_rpc(e, f"the batcher at {self.targets[c]}") from None

    async def each(self, call) -> list[tuple[str, object]]:
        """call(channel) on EVERY batcher the target stands for (a dns:/// name resolved to
        each of its addresses now, as the batcher does for workers), at once: one
        (address, answer or MeshError) per batcher. Channels are kept per address."""
        targets = await grpcutil.every_address(self.target)
        for address in set(self._each_channels) - {a for a, _ in targets}:
            await self._each_channels.pop(address).close()

        async def one(address: str, server_name: str):
            channel = self._each_channels.get(address)
            if channel is None:
                channel = self._each_channels[address] = grpcutil.channel(
                    address, self.transport, server_name=server_name)
            try:
                return address, await call(channel)
            except grpc.aio.AioRpcError as e:
                return address, grpcutil.error_from_rpc(e, f"the batcher at {address}")

        return list(await asyncio.gather(*(one(a, n) for a, n in targets)))

    async def _every(self, method: str, request, timeout_s: float | None = None
                     ) -> list[tuple[str, object]]:
        """A Batcher method on every batcher: the answers; batchers that are unreachable
        are left out (logged) unless none answers (Unavailable); any other error raises."""
        answers = await self.each(
            lambda channel: getattr(batcher_pb2_grpc.BatcherStub(channel), method)(
                request, timeout=timeout_s))
        ok = [(a, r) for a, r in answers if not isinstance(r, Exception)]
        for address, r in answers:
            if isinstance(r, Unavailable) and ok:
                log.warning("%s: the batcher at %s is unreachable (%s); left out",
                            method, address, r)
            elif isinstance(r, Exception):
                raise r
        return ok

    async def statistics(self, model: str = "", version: str = ""
                         ) -> batcher_pb2.StatisticsResponse:
        """Every batcher's statistics, summed."""
        return (await self.statistics_of_every(model, version))[0]

    async def statistics_of_every(self, model: str = "", version: str = ""
                                  ) -> tuple[batcher_pb2.StatisticsResponse, list[str]]:
        """Every batcher's statistics, summed; and the addresses of those that answered."""
        answers = await self._every(
            "Statistics", batcher_pb2.StatisticsRequest(model=model, version=version), 10.0)
        return merge_statistics([r for _, r in answers]), [a for a, _ in answers]

    async def load_model(self, model: str, versions: list[str] | None = None
                         ) -> batcher_pb2.ModelStatesResponse:
        """Loads on every batcher (they share the workers: the first to ask loads, the
        others wait for READY); a version is READY only if READY for every batcher."""
        answers = await self._every(
            "LoadModel", batcher_pb2.LoadModelRequest(model=model, versions=versions or []))
        return merge_states([r for _, r in answers])

    async def unload_model(self, model: str, versions: list[str] | None = None
                           ) -> batcher_pb2.ModelStatesResponse:
        """Returns once every reachable batcher refuses the model (the others learn it from
        the cluster's model control when they are back)."""
        answers = await self._every(
            "UnloadModel", batcher_pb2.UnloadModelRequest(model=model, versions=versions or []))
        return merge_states([r for _, r in answers])

    async def model_states(self, model: str = "") -> batcher_pb2.ModelStatesResponse:
        return await self._unary("ModelStates", batcher_pb2.ModelStatesRequest(model=model))


def deliver_block(b: batcher_pb2.ResultBlock, pending: dict[int, asyncio.Future],
                  target: str) -> None:
    """Each pending request of a block gets its rows of the block's outputs (sliced when
    its response is built); a block that does not add up fails its requests."""
    futures = [pending.pop(request_id, None) for request_id in b.request_ids]
    try:
        block = _Block(b)
    except ValueError as e:
        error = Unavailable(f"the batcher at {target} sent a bad result block: {e}")
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(error)
        return
    row = 0
    for future, rows, queue_ns in zip(futures, b.rows or (0,), b.queue_ns, strict=True):
        if future is not None and not future.done():
            future.set_result(BlockResult(block, row, rows, queue_ns))
        row += rows


class Output(NamedTuple):
    """One output of a request's result: raw row-major little-endian bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


class _Block:
    """A ResultBlock's outputs, read once for all its requests: (name, datatype, shape
    past dimension 0, bytes, bytes per row)."""

    __slots__ = ("tensors", "batched", "compute_ns", "batch_size")

    def __init__(self, b: batcher_pb2.ResultBlock):
        self.compute_ns, self.batch_size = b.compute_ns, b.batch_size
        self.batched = bool(b.rows)
        n = len(b.request_ids)
        if len(b.queue_ns) != n or (b.rows and len(b.rows) != n) or (not b.rows and n != 1):
            raise ValueError(f"{n} requests, {len(b.rows)} row counts, "
                             f"{len(b.queue_ns)} queue times")
        rows = sum(b.rows)
        self.tensors = []
        for t in b.outputs:
            shape, data = tuple(t.shape), t.data
            if not self.batched:
                self.tensors.append(Output(t.name, t.datatype, shape, data))
                continue
            if not shape or shape[0] != rows or len(data) % max(rows, 1):
                raise ValueError(f"output '{t.name}' has shape {list(shape)} and "
                                 f"{len(data)} bytes for {rows} rows")
            self.tensors.append((t.name, t.datatype, shape[1:], data, len(data) // max(rows, 1)))


class BlockResult:
    """One request's result out of a ResultBlock (what InferResult carries otherwise)."""

    __slots__ = ("block", "row", "rows", "queue_ns")
    code = 0
    message = ""

    def __init__(self, block: _Block, row: int, rows: int, queue_ns: int):
        self.block, self.row, self.rows, self.queue_ns = block, row, rows, queue_ns

    @property
    def compute_ns(self) -> int:
        return self.block.compute_ns

    @property
    def batch_size(self) -> int:
        return self.block.batch_size

    @property
    def outputs(self) -> list[Output]:
        block = self.block
        if not block.batched:
            return block.tensors
        start, rows = self.row, self.rows
        return [Output(name, datatype, (rows, *inner),
                       data[start * per_row:(start + rows) * per_row])
                for name, datatype, inner, data, per_row in block.tensors]


@dataclass(slots=True)
class Sent:
    """A request sent on a stream, its result not awaited yet."""

    request: batcher_pb2.InferRequest
    timeout_s: float | None
    stream: _Stream
    future: asyncio.Future
    timer: asyncio.TimerHandle | None


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(
            DeadlineExceeded(f"no answer from the batcher within {timeout_s:.3f}s"))


def merge_statistics(responses: list[batcher_pb2.StatisticsResponse]
                     ) -> batcher_pb2.StatisticsResponse:
    """Several batchers' statistics as one: counts and durations summed per model version
    (and per batch size), the latest last_inference_ms."""
    merged: dict[tuple[str, str], batcher_pb2.ModelStats] = {}
    for response in responses:
        for s in response.models:
            m = merged.get((s.model, s.version))
            if m is None:
                merged[(s.model, s.version)] = m = batcher_pb2.ModelStats()
                m.CopyFrom(s)
                continue
            m.last_inference_ms = max(m.last_inference_ms, s.last_inference_ms)
            m.inference_count += s.inference_count
            m.execution_count += s.execution_count
            for name in ("success", "fail", "queue", "compute_infer"):
                _add(getattr(m, name), getattr(s, name))
            sizes = {b.batch_size: b for b in m.batch_stats}
            for b in s.batch_stats:
                if b.batch_size in sizes:
                    _add(sizes[b.batch_size].compute_infer, b.compute_infer)
                else:
                    m.batch_stats.add().CopyFrom(b)
    out = batcher_pb2.StatisticsResponse(models=[merged[k] for k in sorted(merged)])
    for m in out.models:
        m.batch_stats.sort(key=lambda b: b.batch_size)
    return out


def _add(total: batcher_pb2.Duration, d: batcher_pb2.Duration) -> None:
    total.count += d.count
    total.ns += d.ns


_RANK = {"READY": 0, "LOADING": 1, "UNAVAILABLE": 2}


def merge_states(responses: list[batcher_pb2.ModelStatesResponse]
                 ) -> batcher_pb2.ModelStatesResponse:
    """Several batchers' model states as one: per version, the least ready of them."""
    merged: dict[tuple[str, str], batcher_pb2.ModelVersionState] = {}
    for response in responses:
        for s in response.versions:
            key = (s.model, s.version)
            if key not in merged or _RANK.get(s.state, 3) > _RANK.get(merged[key].state, 3):
                merged[key] = s
    return batcher_pb2.ModelStatesResponse(versions=list(merged.values()))

