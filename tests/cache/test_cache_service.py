"""The Cache service through gRPC: in-process on port 0 via the generated stub, and as
its own process (python -m meshserve.cache) with health."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.cache.config import Settings, from_args
from meshserve.cache.keys import request_digest
from meshserve.cache.server import create_server
from meshserve.common.errors import ConfigError
from meshserve.pb.meshserve.v1 import cache_pb2, cache_pb2_grpc


def ckey(n: int, version="1") -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(model="digits", version=version, digest=n.to_bytes(32, "big"))


def with_service(test, redis_url: str = "", **settings):
    """Runs test(stub) against an in-process cache server on port 0."""
    async def main():
        server, port, _health, cache = await create_server(
            Settings(host="127.0.0.1", port=0, metrics_port=-1, redis_url=redis_url,
                     redis_timeout_ms=1000, **settings))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await test(cache_pb2_grpc.CacheStub(channel))
        finally:
            await server.stop(None)
            await cache.close()
    asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def redis_url(request):
    return request.getfixturevalue("redis_server").url if request.param == "redis" else ""


def test_unary_lookup_store_invalidate_stats(redis_url):
    async def test(stub):
        miss = await stub.Lookup(cache_pb2.LookupRequest(id=7, keys=[ckey(1), ckey(2)]))
        assert miss.id == 7 and [r.hit for r in miss.results] == [False, False]
        gen = miss.results[0].generation
        stored = await stub.Store(cache_pb2.StoreRequest(id=8, entries=[
            cache_pb2.StoreEntry(key=ckey(1), value=b"out", generation=gen),
            cache_pb2.StoreEntry(key=ckey(2), value=b"x" * 2000, generation=gen),
            cache_pb2.StoreEntry(key=ckey(3), value=b"old", generation=gen - 1),
        ]))
        assert (stored.id, stored.stored, stored.skipped, stored.dropped) == (8, 1, 2, 0)
        hit = await stub.Lookup(cache_pb2.LookupRequest(keys=[ckey(1), ckey(2)]))
        assert [(r.hit, r.value) for r in hit.results] == [(True, b"out"), (False, b"")]
        removed = await stub.Invalidate(cache_pb2.InvalidateRequest(model="digits"))
        assert removed.removed == 1
        stats = await stub.Stats(cache_pb2.StatsRequest())
        assert (stats.backend, stats.hits, stats.misses, stats.stores, stats.too_large) == (
            "redis" if redis_url else "memory", 1, 3, 1, 1)
    with_service(test, redis_url, max_entry_bytes=1000)


def test_invalid_requests_are_invalid_argument():
    async def test(stub):
        bad_keys = [
            cache_pb2.CacheKey(model="", version="1", digest=bytes(32)),
            cache_pb2.CacheKey(model="m", version="1", digest=b"short"),
        ]
        for bad in bad_keys:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Lookup(cache_pb2.LookupRequest(keys=[bad]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Store(cache_pb2.StoreRequest(
                    entries=[cache_pb2.StoreEntry(key=bad, value=b"v")]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Invalidate(cache_pb2.InvalidateRequest(model=""))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "digest" in str(await _stream_error(stub, bad_keys[1]))
    with_service(test)


async def _stream_error(stub, bad_key):
    call = stub.LookupStream()
    await call.write(cache_pb2.LookupRequest(id=1, keys=[bad_key]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details()


def test_streams_answer_every_message_by_id(redis_url):
    async def test(stub):
        lookups = stub.LookupStream()
        for i in range(1, 21):
            await lookups.write(cache_pb2.LookupRequest(id=i, keys=[ckey(i), ckey(i + 100)]))
        answers = {}
        for _ in range(20):
            response = await lookups.read()
            answers[response.id] = response
        assert sorted(answers) == list(range(1, 21))
        gen = answers[1].results[0].generation
        stores = stub.StoreStream()
        for i in range(1, 11):
            await stores.write(cache_pb2.StoreRequest(id=i, entries=[
                cache_pb2.StoreEntry(key=ckey(i), value=str(i).encode(), generation=gen)]))
        await stores.done_writing()
        stored = [r async for r in stores]
        assert sorted(r.id for r in stored) == list(range(1, 11))
        assert all(r.stored == 1 for r in stored)
        await lookups.write(cache_pb2.LookupRequest(id=99, keys=[ckey(3), ckey(50)]))
        last = await lookups.read()
        assert last.id == 99
        assert [(r.hit, r.value) for r in last.results] == [(True, b"3"), (False, b"")]
        await lookups.done_writing()
        assert await lookups.read() == grpc.aio.EOF
        assert (await lookups.code()) == grpc.StatusCode.OK
    with_service(test, redis_url)


def test_redis_down_keeps_answering(redis_server):
    async def test(stub):
        redis_server.stop()
        for _ in range(3):
            response = await stub.Lookup(cache_pb2.LookupRequest(keys=[ckey(1)]))
            assert [(r.hit, r.generation) for r in response.results] == [(False, 0)]
            stored = await stub.Store(cache_pb2.StoreRequest(
                entries=[cache_pb2.StoreEntry(key=ckey(1), value=b"v", generation=1)]))
            assert (stored.stored, stored.dropped) == (0, 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Invalidate(cache_pb2.InvalidateRequest(model="digits", version="1"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await stub.Stats(cache_pb2.StatsRequest())).errors >= 6
    with_service(test, redis_server.url)


def test_settings_from_flags_and_env():
    s = from_args(["--port", "0", "--default-ttl-s", "5"], env={"REDIS_URL": "redis://h:1/0"})
    assert (s.port, s.default_ttl_s, s.redis_url, s.backend_name) == (0, 5, "redis://h:1/0",
                                                                     "redis")
    s = from_args([], env={"REDIS_URL": "redis://a", "MESHSERVE_REDIS_URL": "redis://b"})
    assert s.redis_url == "redis://b"
    assert from_args([], env={}).backend_name == "memory"
    with pytest.raises(ConfigError):
        Settings(default_ttl_s=0)
    with pytest.raises(SystemExit):
        from_args(["--redis-url", "http://x"], env={})


def test_service_process_with_health(start_service, redis_server):
    proc = start_service("cache", ["--port", "0", "--metrics-port", "0", "--host", "127.0.0.1",
                                   "--redis-url", redis_server.url, "--redis-timeout-ms", "1000"])
    digest = request_digest("digits", "1", [("x", "FP32", [1], b"\0\0\0\0")], [])
    key = cache_pb2.CacheKey(model="digits", version="1", digest=digest)

    async def main():
        async with grpc.aio.insecure_channel(proc.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="meshserve.v1.Cache"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = cache_pb2_grpc.CacheStub(channel)
            miss = (await stub.Lookup(cache_pb2.LookupRequest(keys=[key]))).results[0]
            await stub.Store(cache_pb2.StoreRequest(entries=[
                cache_pb2.StoreEntry(key=key, value=b"y", generation=miss.generation)]))
            hit = (await stub.Lookup(cache_pb2.LookupRequest(keys=[key]))).results[0]
            assert (hit.hit, hit.value) == (True, b"y")
    asyncio.run(main())
    assert proc.stop() == 0
