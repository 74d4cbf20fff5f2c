"""CacheClient: one coalesced LookupStream for many callers; misses, never errors."""

import asyncio
import socket

import pytest

from meshserve.cache.client import CacheClient
from meshserve.cache.config import Settings
from meshserve.cache.server import create_server
from meshserve.common.errors import Unavailable
from meshserve.pb.meshserve.v1 import cache_pb2


def ckey(n: int, version="1") -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(model="digits", version=version, digest=n.to_bytes(32, "big"))


async def started_service(redis_url=""):
    return await create_server(Settings(host="127.0.0.1", port=0, metrics_port=-1,
                                        redis_url=redis_url, redis_timeout_ms=1000))


@pytest.fixture(params=["memory", "redis"])
def redis_url(request):
    return request.getfixturevalue("redis_server").url if request.param == "redis" else ""


async def wait_for(condition, timeout_s=20.0):
    """Waits (bounded) for something another task or process does."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.05)


def test_concurrent_lookups_are_coalesced_and_routed(redis_url):
    async def main():
        server, port, _health, cache = await started_service(redis_url)
        client = CacheClient(f"127.0.0.1:{port}", timeout_s=5.0)
        await client.start()
        try:
            first = await client.lookup([ckey(0)])
            gen = first[0].generation
            assert gen > 0
            client.store([cache_pb2.StoreEntry(key=ckey(n), value=b"v%d" % n, generation=gen)
                          for n in range(0, 200, 2)])

            async def stored():
                return client.counters.stored == 100
            await wait_for(stored)
            sent_before = client.counters.lookup_messages
            # 200 callers at once, each with its own keys (even: stored, odd: not)
            results = await asyncio.gather(*(client.lookup([ckey(n), ckey(n + 1000)])
                                             for n in range(200)))
            for n, (a, b) in enumerate(results):
                assert (a.hit, a.value) == ((True, b"v%d" % n) if n % 2 == 0 else (False, b""))
                assert not b.hit and b.generation == gen
            messages = client.counters.lookup_messages - sent_before
            assert 1 <= messages < 200  # coalesced: far fewer messages than callers
            assert (await client.stats()).hits >= 100
        finally:
            await client.close()
            await server.stop(None)
            await cache.close()
    asyncio.run(main())


def test_misses_when_the_service_is_down_then_back():
    async def main():
        server, port, _health, cache = await started_service()
        client = CacheClient(f"127.0.0.1:{port}", timeout_s=1.0)
        await client.start()
        try:
            gen = (await client.lookup([ckey(1)]))[0].generation
            client.store([cache_pb2.StoreEntry(key=ckey(1), value=b"v", generation=gen)])

            async def hit():
                return (await client.lookup([ckey(1)]))[0].hit
            await wait_for(hit)
            await server.stop(None)
            for _ in range(5):  # never raises; misses with generation 0
                results = await client.lookup([ckey(1), ckey(2)])
                assert [(r.hit, r.generation) for r in results] == [(False, 0), (False, 0)]
                client.store([cache_pb2.StoreEntry(key=ckey(2), value=b"v", generation=gen)])
            assert client.counters.failed_keys >= 10
            with pytest.raises(Unavailable):
                await client.invalidate("digits")
            # the service comes back on the same port: the client reconnects by itself
            server2, _, _, _ = await create_server(
                Settings(host="127.0.0.1", port=port, metrics_port=-1), backend=cache.backend)
            try:
                await wait_for(hit)
                assert await client.invalidate("digits", "1") == 1
            finally:
                await server2.stop(None)
        finally:
            await client.close()
            await cache.close()
    asyncio.run(main())


def test_never_raises_on_unreachable_or_invalid():
    async def main():
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = CacheClient(f"127.0.0.1:{port}", timeout_s=0.2)
        await client.start()
        try:
            for _ in range(3):
                results = await client.lookup([ckey(1), cache_pb2.CacheKey(model="m")])
                assert [r.hit for r in results] == [False, False]
                client.store([cache_pb2.StoreEntry(key=ckey(1), value=b"v", generation=1)])
            assert await client.lookup([]) == []
            with pytest.raises(Unavailable):
                await client.stats()
        finally:
            await client.close()
        unstarted = CacheClient("127.0.0.1:1")
        assert not (await unstarted.lookup([ckey(1)]))[0].hit
        unstarted.store([cache_pb2.StoreEntry(key=ckey(1))])
        assert unstarted.counters.store_entries_dropped == 1
    asyncio.run(main())


def test_slow_answers_time_out_as_misses():
    """A caller's timeout gives misses; a late answer does not disturb later calls."""
    async def main():
        server, port, _health, cache = await started_service()
        original = cache.lookup
        slow = asyncio.Event()

        async def lookup(keys):
            if slow.is_set():
                await asyncio.sleep(0.5)
            return await original(keys)
        cache.lookup = lookup
        client = CacheClient(f"127.0.0.1:{port}", timeout_s=0.1)
        await client.start()
        try:
            assert (await client.lookup([ckey(1)]))[0].generation > 0
            slow.set()
            assert (await client.lookup([ckey(1)]))[0].generation == 0
            slow.clear()
            await asyncio.sleep(0.6)  # let the late answer arrive and be ignored
            assert (await client.lookup([ckey(1)]))[0].generation > 0
        finally:
            await client.close()
            await server.stop(None)
            await cache.close()
    asyncio.run(main())


def test_invalidations_are_announced_to_every_client_and_streams_report_availability():
    """What keeps a gateway's L1 exact: every client hears of an invalidation made through
    any of them, and learns when a lookup stream is down (announcements could be lost)."""
    async def main():
        server, port, _health, cache = await started_service()
        clients = [CacheClient(f"127.0.0.1:{port}", timeout_s=5.0) for _ in range(2)]
        heard: list[list[tuple[str, str]]] = [[], []]
        availability: list[bool] = []
        for client, log in zip(clients, heard, strict=True):
            client.on_invalidated = lambda model, version, log=log: log.append((model, version))
            await client.start()
        clients[1].on_availability = availability.append
        try:
            for client in clients:  # one lookup each: both streams are open
                assert (await client.lookup_one(ckey(1))).generation > 0
            assert all(c.available() for c in clients)
            await clients[0].invalidate("digits", "1")
            await clients[0].invalidate("cnn")

            async def announced():
                return all(log == [("digits", "1"), ("cnn", "")] for log in heard)
            await wait_for(announced)
            # lookups still answered after the announcements (they are not answers)
            gen = (await clients[1].lookup_one(ckey(1))).generation
            clients[1].store_one(cache_pb2.StoreEntry(key=ckey(1), value=b"v", generation=gen))

            async def hit():
                return (await clients[1].lookup_one(ckey(1))).hit
            await wait_for(hit)
            await server.stop(None)

            async def down():
                return availability and availability[-1] is False
            await wait_for(down)
            assert not clients[1].available()
            assert not (await clients[1].lookup_one(ckey(1))).hit
        finally:
            for client in clients:
                await client.close()
            await cache.close()
    asyncio.run(main())
