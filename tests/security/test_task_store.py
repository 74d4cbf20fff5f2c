"""The in-process task store (a gateway without Redis) is bounded: per API key, by count
and by bytes, and forgets expired tasks without scanning every idempotency key."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.common.errors import Overloaded
from meshserve.tasks.queues import MemoryQueue
from meshserve.tasks.records import NewTask, QueueSettings


def submit_until_refused(queue: MemoryQueue, owner: str, total: int, batch: int = 1000,
                         size: int = 16) -> int:
    async def main():
        accepted = 0
        while accepted < total:
            tasks = [NewTask(b"r" * size, owner=owner) for _ in range(batch)]
            try:
                accepted += len(await queue.submit(tasks))
            except Overloaded as e:
                return accepted, str(e)
        return accepted, ""
    return asyncio.run(main())


def test_100k_tasks_from_one_key_stop_at_its_quota():
    queue = MemoryQueue(QueueSettings())  # the defaults: 10 000 per key
    accepted, why = submit_until_refused(queue, "key-a", 100_000)
    assert accepted == 10_000
    assert "this API key holds 10000 tasks" in why
    # Another key is not starved by the first.
    assert submit_until_refused(queue, "key-b", 1000)[0] == 1000


def test_the_store_is_bounded_by_bytes_and_count():
    queue = MemoryQueue(QueueSettings(max_stored_bytes=1024 * 1024, max_per_key=10**6))
    accepted, why = submit_until_refused(queue, "k", 1000, batch=1, size=100 * 1024)
    assert accepted == 10 and "the task store is full" in why
    queue = MemoryQueue(QueueSettings(max_stored=500, max_per_key=10**6, max_queue=10**6))
    assert submit_until_refused(queue, "", 10_000, batch=100)[0] == 500


def test_expired_tasks_free_their_key_quota_and_idempotency_keys():
    settings = QueueSettings(task_ttl_s=1.0, result_ttl_s=1.0, max_per_key=100)
    now = [1_000_000]
    queue = MemoryQueue(settings, clock=lambda: now[0])

    async def main():
        await queue.submit([NewTask(b"x", idempotency_key=f"idem-{i}", owner="k")
                            for i in range(100)])
        with pytest.raises(Overloaded):
            await queue.submit([NewTask(b"x", owner="k")])
        now[0] += 1000 + 2 * 1000  # past every task's deadline and twice its result TTL
        await queue.submit([NewTask(b"x", owner="k")])  # forgets the expired ones first

    asyncio.run(main())
    assert len(queue.tasks) == 1 and not queue._idem
    assert queue._per_owner == {"k": 1} and queue._bytes == 1


def test_a_keys_quota_on_the_redis_queue_through_the_gateway(start_gateway, redis_server,
                                                             tmp_path):
    """A real gateway on Redis: past --async-max-tasks-per-key a key's Submit is refused
    RESOURCE_EXHAUSTED with the reason; another key still submits."""
    import grpc

    from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb
    from meshserve.pb.meshserve.v1 import async_inference_pb2_grpc as apb_grpc
    from tests.protection.conftest import infer_request, write_keys

    keys = tmp_path / "keys.json"
    write_keys(keys, {"name": "a", "key": "key-a", "models": ["digits"]},
               {"name": "b", "key": "key-b", "models": ["digits"]})
    gateway = start_gateway("--api-keys-file", str(keys), "--redis-url", redis_server.url,
                            "--async-runners", "0", "--async-max-tasks-per-key", "5")

    async def main():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = apb_grpc.AsyncInferenceStub(channel)

            async def submit(key):
                return await stub.Submit(apb.SubmitRequest(request=infer_request()), timeout=30,
                                         metadata=(("authorization", f"Bearer {key}"),))

            for _ in range(5):
                await submit("key-a")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await submit("key-a")
            await submit("key-b")
            return e.value.code(), e.value.details()

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this API key holds 5 tasks" in details and "at most 5" in details
