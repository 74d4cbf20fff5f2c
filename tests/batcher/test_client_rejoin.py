"""A gateway's BatcherClient rides through a batcher restart: a request whose stream broke
goes once more when a batcher answers on the same address again, within the rejoin wait
and its own timeout; past them it fails UNAVAILABLE. Real gRPC, a fake batcher servicer."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshserve.batcher.client import BatcherClient
from meshserve.common.errors import Unavailable
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc, tensor_pb2
from tests.conftest import free_port


class FakeBatcher(batcher_pb2_grpc.BatcherServicer):
    """answer=False: holds every request (a batcher about to die); True: answers each."""

    def __init__(self, answer: bool):
        self.answer = answer
        self.seen: list[str] = []

    async def Infer(self, request_iterator, context):
        async for message in request_iterator:
            self.seen += [r.model for r in message.requests]
            # Like the batcher, every message is acknowledged (flow control).
            yield batcher_pb2.InferResults(received=1, results=[
                batcher_pb2.InferResult(request_id=r.request_id, code=0, batch_size=1)
                for r in message.requests if self.answer])


async def serve(port: int, servicer: FakeBatcher) -> grpc.aio.Server:
    server = grpc.aio.server()
    batcher_pb2_grpc.add_BatcherServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


INPUT = [tensor_pb2.Tensor(name="input", datatype="FP32", shape=[1], data=b"\0\0\0\0")]


def test_a_request_on_a_batcher_that_dies_is_answered_by_its_restart():
    async def main():
        port = free_port()
        dying, restarted = FakeBatcher(answer=False), FakeBatcher(answer=True)
        server = await serve(port, dying)
        client = BatcherClient(f"127.0.0.1:{port}", rejoin_wait_s=10.0)
        await client.start()
        try:
            call = asyncio.ensure_future(client.infer("m", "1", INPUT, []))
            while not dying.seen:
                await asyncio.sleep(0.01)
            await server.stop(None)  # the stream breaks with the request on it
            await asyncio.sleep(0.3)
            assert not call.done()  # waiting for a batcher, not failed
            server = await serve(port, restarted)
            result = await asyncio.wait_for(call, 10)
            assert result.code == 0
            assert dying.seen == ["m"] and restarted.seen == ["m"]  # sent again, once
        finally:
            await client.close()
            await server.stop(None)
    asyncio.run(main())


@pytest.mark.parametrize("timeout_s", [None, 0.3])
def test_a_batcher_that_does_not_come_back_fails_the_request_after_the_wait(timeout_s):
    async def main():
        port = free_port()
        server = await serve(port, dying := FakeBatcher(answer=False))
        client = BatcherClient(f"127.0.0.1:{port}", rejoin_wait_s=0.5 if timeout_s is None else 30)
        await client.start()
        try:
            call = asyncio.ensure_future(client.infer("m", "1", INPUT, [], timeout_s=timeout_s))
            while not dying.seen:
                await asyncio.sleep(0.01)
            await server.stop(None)
            await asyncio.sleep(0.1)
            assert not call.done()
            with pytest.raises(Unavailable):
                await asyncio.wait_for(call, 5)  # the wait (0.5 s) or the timeout (0.3 s)
        finally:
            await client.close()
    asyncio.run(main())


def test_closing_the_client_ends_the_wait_at_once():
    async def main():
        port = free_port()
        server = await serve(port, dying := FakeBatcher(answer=False))
        client = BatcherClient(f"127.0.0.1:{port}", rejoin_wait_s=30.0)
        await client.start()
        call = asyncio.ensure_future(client.infer("m", "1", INPUT, []))
        while not dying.seen:
            await asyncio.sleep(0.01)
        await server.stop(None)
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(call, 2)
    asyncio.run(main())


def test_a_batcher_never_reached_fails_at_once():
    async def main():
        client = BatcherClient(f"127.0.0.1:{free_port()}", rejoin_wait_s=60.0)
        await client.start()
        try:
            with pytest.raises(Unavailable):
                # far below the 60 s wait: a batcher that never answered is not restarting
                await asyncio.wait_for(client.infer("m", "1", INPUT, []), 5)
        finally:
            await client.close()
    asyncio.run(main())
