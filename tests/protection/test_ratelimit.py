"""Token buckets: in memory with a controlled clock, in a real Redis, and the fallback."""

from __future__ import annotations

import asyncio
import math

import pytest

from meshserve.common.errors import ConfigError
from meshserve.common.ratelimit import (
    Bucket,
    MemoryLimiter,
    RateLimit,
    RedisLimiter,
    parse_model_limits,
)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def bucket(name="k", rate=2.0, burst=4.0, scope="key"):
    return Bucket(name, RateLimit(rate, burst), scope)


def test_a_full_bucket_admits_the_burst_then_refuses_with_the_wait():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    b = [bucket(rate=2.0, burst=4.0)]
    assert [limiter.take(b) for _ in range(4)] == [None] * 4
    refusal = limiter.take(b)
    assert refusal is not None and refusal.scope == "key"
    assert refusal.retry_after_s == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.25
    assert limiter.take(b).retry_after_s == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take(b) is None  # refilled one token
    assert limiter.take(b) is not None


def test_refill_is_capped_at_the_burst():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    b = [bucket(rate=10.0, burst=3.0)]
    for _ in range(3):
        assert limiter.take(b) is None
    clock.now += 1000.0
    admitted = sum(limiter.take(b) is None for _ in range(10))
    assert admitted == 3


def test_n_per_second_over_time():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    b = [bucket(rate=5.0, burst=5.0)]
    admitted = 0
    for _ in range(100):  # 10 s at 10 tries per second
        admitted += limiter.take(b) is None
        clock.now += 0.1
    # the burst of 5, then 5 per second over the 9.9 s between the first and last try
    assert admitted == 5 + 49


def test_all_buckets_or_none_and_the_longest_wait_wins():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    key = bucket("key:a", rate=100.0, burst=10.0, scope="key")
    model = bucket("model:m", rate=1.0, burst=1.0, scope="model")
    assert limiter.take([key, model]) is None
    refusal = limiter.take([key, model])
    assert refusal.scope == "model" and refusal.retry_after_s == pytest.approx(1.0)
    # the refused request charged nothing to the key's bucket: 9 tokens left
    assert sum(limiter.take([key]) is None for _ in range(20)) == 9


def test_a_batch_larger_than_the_burst_never_fits():
    limiter = MemoryLimiter(Clock())
    refusal = limiter.take([bucket(burst=4.0)], cost=5)
    assert refusal is not None and math.isinf(refusal.retry_after_s)


def test_model_limits_flag():
    assert parse_model_limits("digits=100:200, other=0.5") == {
        "digits": RateLimit(100.0, 200.0), "other": RateLimit(0.5, 1.0)}
    assert parse_model_limits("") == {}
    for bad in ("digits", "digits=abc", "digits=0", "digits=5:0", "=5"):
        with pytest.raises(ConfigError, match="--model-rate-limits"):
            parse_model_limits(bad)


def test_redis_buckets_are_shared_and_atomic(redis_server):
    async def main():
        # A timeout far above any scheduling delay: a loaded machine must not make a limiter
        # fall back to its in-memory buckets here (that path has its own test below).
        a, b = (RedisLimiter(redis_server.url, timeout_s=10.0),
                RedisLimiter(redis_server.url, timeout_s=10.0))
        try:
            buckets = [bucket("key:shared", rate=0.01, burst=10.0)]
            results = await asyncio.gather(*(lim.take(buckets) for lim in [a, b] * 15))
            assert not a.degraded and not b.degraded, "a limiter fell back to its memory"
            admitted = [r for r in results if r is None]
            refused = [r for r in results if r is not None]
            assert len(admitted) == 10 and len(refused) == 20
            assert all(r.scope == "key" and 0 < r.retry_after_s <= 100.0 for r in refused)
            # all-or-none across buckets in Redis too
            other = bucket("key:other", rate=0.01, burst=5.0)
            tiny = bucket("model:tiny", rate=0.01, burst=1.0, scope="model")
            assert await a.take([other, tiny]) is None
            refusal = await a.take([other, tiny])
            assert refusal.scope == "model"
            assert sum([await b.take([other]) is None for _ in range(10)]) == 4
            assert not a.degraded
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_down_falls_back_to_memory_and_comes_back(redis_server):
    async def main():
        limiter = RedisLimiter(redis_server.url, retry_s=0.0)
        try:
            b = [bucket("key:fb", rate=0.01, burst=3.0)]
            assert await limiter.take(b) is None
            redis_server.stop()
            # the in-memory bucket decides (a fresh, full one): never an exception
            results = [await limiter.take(b) for _ in range(5)]
            assert limiter.degraded
            assert [r is None for r in results] == [True, True, True, False, False]
            redis_server.start()
            assert await limiter.take(b) is None  # Redis lost its data: a full bucket again
            assert not limiter.degraded
        finally:
            await limiter.close()

    asyncio.run(main())
