"""Graceful drain of a model worker: on SIGTERM it reports draining (WatchStatus), the
batcher sends it no new batch, ends its stream once its batches are answered, and the
worker exits 0 long before its grace period; no request fails meanwhile."""

from __future__ import annotations

import asyncio
import subprocess

import numpy as np

from meshserve.batcher.client import BatcherClient
from meshserve.batcher.records import Batch, BatchReply
from meshserve.batcher.workers import HeldModel, WorkerPool, WorkerReport
from meshserve.common.tensors import to_pb
from tests.conftest import MODELS, ServiceProcess

INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
KEY = ("digits", "1")


class Link:
    def __init__(self, address: str):
        self.address = address

    async def execute(self, batch: Batch) -> BatchReply: ...
    async def load(self, model: str, version: str) -> None: ...
    async def unload(self, model: str, version: str) -> None: ...


def report(draining: bool) -> WorkerReport:
    return WorkerReport("w", "cpu", (HeldModel(*KEY, "READY"),), 0, 0, 8, 0, draining=draining)


def test_pool_sends_nothing_to_a_draining_worker():
    async def main():
        pool = WorkerPool()
        for address in ("a", "b"):
            pool.add(Link(address), max_in_flight=2)
            pool.update(address, report(draining=False), connected=True)
        assert pool.pick(KEY).address == "a"
        pool.update("a", report(draining=True), connected=True)
        assert [w.address for w in pool.holders(KEY)] == ["b"]
        assert pool.pick(KEY).address == "b"
        pool.update("b", report(draining=True), connected=True)
        assert pool.pick(KEY) is None
        assert pool.pick_for_load(("digits", "2")) is None  # nor a load
    asyncio.run(main())


def test_batcher_stops_sending_to_a_draining_worker(start_service):
    worker_args = [*INTERNAL, "--device", "cpu", "--load", "digits",
                   "--model-repository", str(MODELS), "--grace-s", "120"]
    draining = start_service("model_worker", worker_args)
    other = start_service("model_worker", worker_args)
    batcher = start_service("batcher", [
        *INTERNAL, "--model-repository", str(MODELS), "--load", "digits",
        "--workers", f"{draining.address},{other.address}"])

    async def main() -> tuple[int, int]:
        client = BatcherClient(batcher.address)
        await client.start()
        x = to_pb("input", np.random.default_rng(0).random((4, 64), dtype=np.float32))
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()
        answered = 0

        async def caller() -> None:
            nonlocal answered
            while not stopped.done():
                await client.infer("digits", "1", [x], ["predictions"], timeout_s=30)
                answered += 1

        async def drain() -> int:
            await asyncio.sleep(2.0)  # both workers busy by now
            draining.proc.terminate()  # SIGTERM
            # Far less than its 120 s grace: the batcher ended the stream once drained.
            code = await asyncio.to_thread(draining.proc.wait, 60)
            await asyncio.sleep(1.0)  # and the mesh serves on, on the other worker
            stopped.set_result(None)
            return code

        try:
            code, *_ = await asyncio.gather(drain(), *(caller() for _ in range(16)))
        finally:
            await client.close()
        return code, answered

    try:
        code, answered = asyncio.run(main())
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not drain:\n{batcher.output()}") from None
    assert code == 0
    assert answered > 16
    log = batcher.output()
    assert f"model worker {draining.address} is draining; ending its stream" in log
    assert f"model worker {draining.address} drained" in log
    assert "retrying" not in log  # no batch was lost on the drained worker
    assert other.proc.poll() is None


async def served(address: str) -> int:
    client = BatcherClient(address)
    await client.start()
    try:
        return sum(s.inference_count for s in (await client.statistics("digits")).models)
    finally:
        await client.close()


def test_a_draining_batcher_hands_new_requests_to_the_other(start_service):
    """Two batchers behind one target: SIGTERM to one; it refuses new requests as draining (the client sends
    them to b), finishes what it holds, and exits 0 at the end of its grace."""
    worker = start_service("model_worker", [*INTERNAL, "--device", "cpu", "--load", "digits",
                                            "--model-repository", str(MODELS)])
    batchers = [start_service("batcher", [
        *INTERNAL, "--model-repository", str(MODELS), "--load", "digits",
        "--workers", worker.address, "--grace-s", "3"]) for _ in range(2)]

    async def main() -> tuple[int, int, list[str], ServiceProcess]:
        # One round_robin channel over both (as dns:/// gives): the channel alone cannot
        # tell that the open stream's batcher drains; its refusals do.
        client = BatcherClient("ipv4:" + ",".join(b.address for b in batchers), streams=4)
        await client.start()
        x = to_pb("input", np.random.default_rng(0).random((2, 64), dtype=np.float32))
        stopped = asyncio.get_running_loop().create_future()
        answered, failures = 0, []

        async def caller() -> None:
            nonlocal answered
            while not stopped.done():
                try:
                    await client.infer("digits", "1", [x], ["predictions"], timeout_s=30)
                    answered += 1
                except Exception as e:  # noqa: BLE001 - collected, asserted below
                    failures.append(repr(e))
                    return

        async def drain() -> tuple[int, ServiceProcess]:
            await asyncio.sleep(1.5)
            # round_robin placed the streams: drain a batcher that holds some
            counts = [await served(b.address) for b in batchers]
            busy = batchers[counts.index(max(counts))]
            busy.proc.terminate()
            code = await asyncio.to_thread(busy.proc.wait, 30)
            await asyncio.sleep(1.0)
            stopped.set_result(None)
            return code, busy

        try:
            (code, busy), *_ = await asyncio.gather(drain(), *(caller() for _ in range(16)))
        finally:
            await client.close()
        return code, answered, failures, busy

    code, answered, failures, busy = asyncio.run(main())
    assert failures == [], failures[:5]
    assert code == 0
    assert answered > 16
    assert "draining: refusing new requests" in busy.output()
