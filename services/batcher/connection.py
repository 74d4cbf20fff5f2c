"""The gRPC side of the batcher's workers: one WorkerConnection per worker address
(an Execute stream with several batches in flight, coalesced per message; WatchStatus
feeding the pool; Load/Unload), reconnected with backoff; and WorkerDirectory, which
keeps one connection per address of the --workers list, re-resolving dns:/// entries."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from meshserve.batcher import convert
from meshserve.batcher.records import Batch, BatchReply
from meshserve.batcher.workers import WorkerPool
from meshserve.common import grpcutil
from meshserve.common.backoff import Backoff
from meshserve.common.errors import Unavailable
from meshserve.common.grpcutil import dns_host, resolve_dns
from meshserve.common.hops import HopCount
from meshserve.common.transport import Transport
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 300.0
UNLOAD_TIMEOUT_S = 60.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0


class WorkerConnection:
    """A WorkerLink over gRPC to one model worker."""

    def __init__(self, address: str, pool: WorkerPool, transport: Transport | None = None,
                 server_name: str = ""):
        """server_name: the name the worker's certificate carries when address is an IP
        resolved from dns:///name:port (TLS only)."""
        self.address = address
        self.pool = pool
        self.transport = transport
        self.server_name = server_name
        self._stub: worker_pb2_grpc.ModelWorkerStub | None = None
        self._send: asyncio.Queue | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._closed = False
        # The worker reported draining; once nothing is in flight we end the Execute stream.
        self._draining = False
        self._ended = False
        self.sent, self.received = HopCount(), HopCount()  # rows of the batches, both ways

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ WorkerLink

    async def execute(self, batch: Batch) -> BatchReply:
        send = self._send
        if send is None:
            raise Unavailable(f"model worker {self.address} is not connected")
        if self._ended:
            raise Unavailable(f"model worker {self.address} is draining")
        future = asyncio.get_running_loop().create_future()
        self._pending[batch.batch_id] = future
        send.put_nowait((convert.batch_to_pb(batch), batch.rows))
        try:
            return await future
        finally:
            self._pending.pop(batch.batch_id, None)
            self._end_if_drained()

    def _end_if_drained(self) -> None:
        """A draining worker with nothing of ours in flight: half-close Execute, so the
        worker's graceful stop completes as soon as its last batch is answered."""
        if self._draining and not self._ended and not self._pending and self._send is not None:
            self._ended = True
            self._send.put_nowait(None)
            log.info("model worker %s is draining; ending its stream", self.address)

    async def load(self, model: str, version: str, reload: bool = False) -> None:
        stub = self._require_stub()
        try:
            await stub.Load(worker_pb2.LoadRequest(model=model, version=version, reload=reload),
                            timeout=LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise grpcutil.error_from_rpc(e, f"model worker {self.address}") from None

    async def unload(self, model: str, version: str) -> None:
        stub = self._require_stub()
        try:
            await stub.Unload(worker_pb2.UnloadRequest(model=model, version=version),
                              timeout=UNLOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise grpcutil.error_from_rpc(e, f"model worker {self.address}") from None

    def _require_stub(self) -> worker_pb2_grpc.ModelWorkerStub:
        if self._stub is None:
            raise Unavailable(f"model worker {self.address} is not connected")
        return self._stub

    # ------------------------------------------------------------------ streams

    async def _run(self) -> None:
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        failures = 0  # consecutive; only the first is logged as a warning
        while not self._closed:
            channel = grpcutil.channel(self.address, self.transport,
                                       server_name=self.server_name)
            stub = worker_pb2_grpc.ModelWorkerStub(channel)
            tasks: list[asyncio.Task] = []
            try:
                watch = stub.WatchStatus(worker_pb2.StatusRequest())
                first = await watch.read()
                if first is grpc.aio.EOF:
                    raise Unavailable("WatchStatus ended at once")
                send: asyncio.Queue = asyncio.Queue()
                call = stub.Execute(_coalesce(send, self.sent))
                self._stub, self._send = stub, send
                self._draining, self._ended = first.draining, False
                self.pool.update(self.address, convert.report_from_pb(first), connected=True)
                self._end_if_drained()
                log.info("connected to model worker %s (%s)", self.address, first.device)
                failures = 0
                backoff.reset()
                tasks = [asyncio.ensure_future(self._read(call)),
                         asyncio.ensure_future(self._watch(watch))]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()
                if self._ended:
                    log.info("model worker %s drained", self.address)
                else:
                    log.warning("model worker %s closed its stream", self.address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "model worker %s: %s %s", self.address, e.code().name, e.details())
            except Exception as e:  # noqa: BLE001 - reconnect whatever broke
                failures += 1
                log.warning("model worker %s: %s", self.address, e)
            finally:
                for t in tasks:
                    t.cancel()
                self._disconnected()
                await channel.close(grace=None)
            await backoff.wait()

    def _disconnected(self) -> None:
        was_connected = self._send is not None
        self._stub, self._send = None, None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable(
                    f"model worker {self.address} disconnected with the batch in flight"))
        if was_connected:
            log.warning("model worker %s disconnected", self.address)
        self.pool.update(self.address, None, connected=False)

    async def _read(self, call) -> None:
        async for response in call:
            rows = 0
            for r in response.results:
                future = self._pending.pop(r.batch_id, None)
                if future is not None and not future.done():
                    outcome = convert.outcome_from_pb(r)
                    rows += outcome.executed_batch_size
                    future.set_result(outcome)
            self.received.add(rows)

    async def _watch(self, watch) -> None:
        while (status := await watch.read()) is not grpc.aio.EOF:
            self._draining = status.draining
            self.pool.update(self.address, convert.report_from_pb(status), connected=True)
            self._end_if_drained()


async def _coalesce(send: asyncio.Queue, sent: HopCount):
    """Execute's request stream: every batch pending when the stream is free, in one message;
    a None in the queue ends the stream (after the batches queued before it). Queue items
    are (worker_pb2.Batch, its rows)."""
    while True:
        item = await send.get()
        if item is None:
            return
        items, end = [item], False
        while not send.empty() and not end:
            item = send.get_nowait()
            if item is None:
                end = True
            else:
                items.append(item)
        sent.add(sum(n for _, n in items))
        yield worker_pb2.ExecuteRequest(batches=[b for b, _ in items])
        if end:
            return


class WorkerDirectory:
    """One connection per worker address; `dns:///name:port` entries stand for every
    address the name resolves to, re-resolved every resolve_every_s."""

    def __init__(self, entries: tuple[str, ...], pool: WorkerPool, max_in_flight: int,
                 resolve_every_s: float = 5.0, transport: Transport | None = None):
        self.entries, self.pool, self.transport = entries, pool, transport
        self.max_in_flight, self.resolve_every_s = max_in_flight, resolve_every_s
        self.connections: dict[str, WorkerConnection] = {}
        self._resolved: dict[str, set[str]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._sync()
        if any(e.startswith("dns:") for e in self.entries):
            self._task = asyncio.get_running_loop().create_task(self._resolve_loop())

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_every_s)
            try:
                await self._sync()
            except Exception:  # noqa: BLE001 - keep resolving
                log.exception("resolving model workers failed")

    async def _sync(self) -> None:
        addresses: set[str] = set()
        names: dict[str, str] = {}  # resolved IP address -> the name its certificate carries
        for entry in self.entries:
            if entry.startswith("dns:"):
                found = await resolve_dns(entry)
                # A failed lookup keeps the last known addresses.
                if found is not None:
                    self._resolved[entry] = found
                resolved = self._resolved.get(entry, set())
                addresses |= resolved
                names.update(dict.fromkeys(resolved, dns_host(entry)))
            else:
                addresses.add(entry)
        for address in sorted(addresses - set(self.connections)):
            conn = self.connections[address] = WorkerConnection(
                address, self.pool, self.transport, names.get(address, ""))
            self.pool.add(conn, self.max_in_flight)
            conn.start()
            log.info("model worker %s added", address)
        for address in set(self.connections) - addresses:
            conn = self.connections.pop(address)
            await conn.close()
            self.pool.remove(address)
            log.info("model worker %s removed (no longer resolved)", address)

    def hop_counts(self) -> list[tuple[str, HopCount]]:
        out = []
        for conn in self.connections.values():
            out += [("batcher->worker", conn.sent), ("worker->batcher", conn.received)]
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in self.connections.values():
            await conn.close()
        self.connections.clear()
