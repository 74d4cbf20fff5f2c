"""The cache over each backend (a real redis-server, and the in-memory LRU): hits,
TTLs, generations, invalidation, size limits, outages; no gRPC here."""

import asyncio
import os
import pickle
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from meshserve.cache.backends import Entry, Key, MemoryBackend, RedisBackend
from meshserve.cache.core import PredictionCache
from meshserve.common.errors import InvalidInput, Unavailable


def key(n: int, model="digits", version="1") -> Key:
    return Key(model, version, n.to_bytes(32, "big"))


def make_cache(kind: str, redis_url: str | None = None, *, clock=time.monotonic,
               max_entries=1000, max_bytes=1 << 20, max_entry_bytes=4096, default_ttl_s=60):
    if kind == "redis":
        backend = RedisBackend(redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout_s=1.0,
                               backoff_initial_s=0.05, backoff_max_s=0.5)
    else:
        backend = MemoryBackend(max_entries, max_bytes, clock=clock)
    return PredictionCache(backend, CollectorRegistry(), default_ttl_s=default_ttl_s,
                           max_entry_bytes=max_entry_bytes)


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def url(kind, request):
    return request.getfixturevalue("redis_server").url if kind == "redis" else None


async def fill(cache, keys, value=b"v", ttl_s=0):
    """Lookup (for the generation), then store: what a gateway does on a miss."""
    results = await cache.lookup(keys)
    return await cache.store([Entry(k, value + bytes([i]), r.generation, ttl_s)
                              for i, (k, r) in enumerate(zip(keys, results, strict=True))])


def test_miss_then_hit(kind, url):
    async def main():
        cache = make_cache(kind, url)
        keys = [key(1), key(2), key(3, version="2")]
        first = await cache.lookup(keys)
        assert [r.hit for r in first] == [False] * 3
        assert all(r.generation > 0 for r in first)
        outcome = await fill(cache, keys[:2])
        assert (outcome.stored, outcome.skipped, outcome.dropped) == (2, 0, 0)
        again = await cache.lookup(keys)
        assert [r.hit for r in again] == [True, True, False]
        assert [r.value for r in again[:2]] == [b"v\x00", b"v\x01"]
        assert [r.generation for r in again] == [r.generation for r in first]
        stats = cache.stats()
        assert (stats.backend, stats.hits, stats.misses, stats.stores) == (kind, 2, 6, 2)
        await cache.close()
    asyncio.run(main())


def test_redis_ttl_expiry(redis_server):
    async def main():
        cache = make_cache("redis", redis_server.url)
        await fill(cache, [key(1)], ttl_s=1)
        assert (await cache.lookup([key(1)]))[0].hit
        deadline = time.monotonic() + 10
        while (await cache.lookup([key(1)]))[0].hit:
            assert time.monotonic() < deadline, "entry did not expire"
            await asyncio.sleep(0.2)
        await cache.close()
    asyncio.run(main())


def test_memory_ttl_expiry_with_injected_clock():
    now = [100.0]

    async def main():
        cache = make_cache("memory", clock=lambda: now[0], default_ttl_s=30)
        await fill(cache, [key(1)], ttl_s=5)
        await fill(cache, [key(2)])  # default TTL
        now[0] += 4.9
        assert [r.hit for r in await cache.lookup([key(1), key(2)])] == [True, True]
        now[0] += 0.2
        assert [r.hit for r in await cache.lookup([key(1), key(2)])] == [False, True]
        assert cache.stats().entries == 1  # dropped when met
        now[0] += 30
        assert not (await cache.lookup([key(2)]))[0].hit
        assert cache.stats().entries == 0
    asyncio.run(main())


def test_memory_lru_eviction_by_entries():
    async def main():
        cache = make_cache("memory", max_entries=3)
        await fill(cache, [key(1), key(2), key(3)])
        await cache.lookup([key(1)])  # 1 is now the most recently used
        await fill(cache, [key(4)])
        hits = [r.hit for r in await cache.lookup([key(1), key(2), key(3), key(4)])]
        assert hits == [True, False, True, True]
        assert cache.stats().entries == 3
    asyncio.run(main())


def test_memory_lru_eviction_by_bytes():
    async def main():
        # each entry: 100 bytes of value + 32 of digest
        cache = make_cache("memory", max_bytes=3 * 132 + 10)
        for n in range(1, 5):
            await fill(cache, [key(n)], value=b"x" * 99)
        hits = [r.hit for r in await cache.lookup([key(n) for n in range(1, 5)])]
        assert hits == [False, True, True, True]
        assert cache.stats().bytes == 3 * 132
    asyncio.run(main())


def test_entry_over_max_entry_bytes_is_not_cached(kind, url):
    async def main():
        cache = make_cache(kind, url, max_entry_bytes=100)
        gen = (await cache.lookup([key(1)]))[0].generation
        outcome = await cache.store([Entry(key(1), b"x" * 101, gen, 0),
                                     Entry(key(2), b"x" * 100, gen, 0)])
        assert (outcome.stored, outcome.skipped) == (1, 1)
        assert [r.hit for r in await cache.lookup([key(1), key(2)])] == [False, True]
        assert cache.stats().too_large == 1
        await cache.close()
    asyncio.run(main())


def test_invalidate_after_reload(kind, url):
    async def main():
        cache = make_cache(kind, url)
        old = (await cache.lookup([key(1)]))[0].generation
        await fill(cache, [key(1), key(2)])
        await fill(cache, [key(3, version="2")])
        assert await cache.invalidate("digits", "1") == 2
        after = await cache.lookup([key(1), key(2), key(3, version="2")])
        assert [r.hit for r in after] == [False, False, True]
        assert after[0].generation > old
        # a result computed before the reload arrives late: skipped, never served
        late = await cache.store([Entry(key(1), b"stale", old, 0)])
        assert (late.stored, late.skipped) == (0, 1)
        assert not (await cache.lookup([key(1)]))[0].hit
        # with the new generation it is stored
        fresh = await cache.store([Entry(key(1), b"new", after[0].generation, 0)])
        assert fresh.stored == 1
        assert (await cache.lookup([key(1)]))[0].value == b"new"
        await cache.close()
    asyncio.run(main())


def test_invalidate_whole_model(kind, url):
    async def main():
        cache = make_cache(kind, url)
        await fill(cache, [key(1), key(2, version="2"), key(3, version="3")])
        await fill(cache, [key(4, model="other")])
        before = await cache.lookup([key(1), key(2, version="2")])
        assert await cache.invalidate("digits", None) == 3
        after = await cache.lookup([key(1), key(2, version="2"), key(3, version="3"),
                                    key(4, model="other")])
        assert [r.hit for r in after] == [False, False, False, True]
        assert all(a.generation > b.generation for a, b in zip(after[:2], before, strict=True))
        assert await cache.invalidate("nothing-here", None) == 0
        await cache.close()
    asyncio.run(main())


def test_invalid_keys_are_rejected(kind, url):
    async def main():
        cache = make_cache(kind, url)
        for bad in (Key("", "1", bytes(32)), Key("m", "1", bytes(31)), Key("m", "", bytes(32)),
                    Key("a/b", "1", bytes(32)), Key("m{", "1", bytes(32))):
            with pytest.raises(InvalidInput):
                await cache.lookup([bad])
            with pytest.raises(InvalidInput):
                await cache.store([Entry(bad, b"v", 1, 0)])
        with pytest.raises(InvalidInput):
            await cache.invalidate("", None)
        await cache.close()
    asyncio.run(main())


class PickleSideEffect:
    def __reduce__(self):
        return (os.system, ("touch /tmp/meshserve-cache-pickle-ran",))


def test_values_are_opaque_bytes_never_unpickled(kind, url, monkeypatch):
    payload = pickle.dumps(PickleSideEffect())

    def forbidden(*args, **kwargs):
        pytest.fail("pickle was used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)

    async def main():
        cache = make_cache(kind, url)
        await cache.store([Entry(key(1), payload, (await cache.lookup([key(1)]))[0].generation,
                                 0)])
        result = (await cache.lookup([key(1)]))[0]
        assert result.hit and result.value == payload
        await cache.close()
    asyncio.run(main())


def test_redis_killed_then_restarted(redis_server):
    async def main():
        cache = make_cache("redis", redis_server.url)
        await fill(cache, [key(1)])
        assert (await cache.lookup([key(1)]))[0].hit
        redis_server.stop()
        for _ in range(3):  # misses, drops, no exception
            results = await cache.lookup([key(1), key(2)])
            assert [(r.hit, r.generation) for r in results] == [(False, 0), (False, 0)]
            outcome = await cache.store([Entry(key(1), b"v", 5, 0)])
            assert (outcome.stored, outcome.dropped) == (0, 1)
        assert not cache.backend.up
        with pytest.raises(Unavailable):
            await cache.invalidate("digits", "1")
        stats = cache.stats()
        assert stats.errors >= 6 + 3
        redis_server.start()  # same port, data gone
        deadline = time.monotonic() + 20
        while True:
            result = (await cache.lookup([key(1)]))[0]
            if result.generation:
                break
            assert time.monotonic() < deadline, "never reconnected"
            await asyncio.sleep(0.1)
        await cache.store([Entry(key(1), b"again", result.generation, 0)])
        assert (await cache.lookup([key(1)]))[0].value == b"again"
        await cache.close()
    asyncio.run(main())


def test_no_pickle_in_the_cache_package():
    from pathlib import Path

    import meshserve.cache

    for path in Path(meshserve.cache.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "from pickle" not in text, path
        assert "cloudpickle" not in text and "dill" not in text, path


def test_metrics_count_per_key():
    async def main():
        registry = CollectorRegistry()
        cache = PredictionCache(MemoryBackend(10, 1 << 20), registry, default_ttl_s=60,
                                max_entry_bytes=10)
        await fill(cache, [key(1), key(2)])
        await cache.lookup([key(1), key(3)])
        await cache.store([Entry(key(4), b"x" * 11, 1, 0)])
        sample = registry.get_sample_value
        assert sample("meshserve_cache_requests_total", {"result": "hit"}) == 1
        assert sample("meshserve_cache_requests_total", {"result": "miss"}) == 3
        assert sample("meshserve_cache_lookup_seconds_count") == 2
        assert sample("meshserve_cache_entries") == 2
        assert sample("meshserve_cache_bytes") == 2 * (2 + 32)
        assert sample("meshserve_cache_too_large_entries_total") == 1
    asyncio.run(main())
