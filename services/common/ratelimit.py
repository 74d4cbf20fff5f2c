"""Token buckets: in memory (one process), or in Redis (shared by every gateway) with the
in-memory buckets taking over while Redis is unreachable.

A request takes one token (a batch of n: n tokens) from each of its buckets (its API key's,
its model's) atomically: either every bucket has enough and all are charged, or none is
charged and the answer is how long to wait for the bucket that refused. No grpc here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshserve.common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """rate_per_s tokens refill every second, up to burst (the bucket's size)."""

    rate_per_s: float
    burst: float

    def __post_init__(self):
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ConfigError(f"rate_per_s must be > 0, got {self.rate_per_s!r}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ConfigError(f"burst must be >= 1, got {self.burst!r}")


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str  # e.g. "key:team-a" or "model:digits"
    limit: RateLimit
    scope: str  # "key" or "model": the metric label when it refuses


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: str
    retry_after_s: float


def parse_model_limits(text: str) -> dict[str, RateLimit]:
    """--model-rate-limits "digits=100:200,other=5" -> {model: RateLimit}; the burst
    defaults to the rate (at least 1)."""
    limits: dict[str, RateLimit] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        model, sep, spec = item.partition("=")
        rate, _, burst = spec.partition(":")
        try:
            if not sep or not model.strip():
                raise ValueError("expected MODEL=RATE[:BURST]")
            rate_per_s = float(rate)
            limits[model.strip()] = RateLimit(
                rate_per_s, float(burst) if burst else max(1.0, rate_per_s))
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"--model-rate-limits: {item!r}: {e}") from None
    return limits


class _State:
    __slots__ = ("tokens", "updated_s")

    def __init__(self, tokens: float, updated_s: float):
        self.tokens = tokens
        self.updated_s = updated_s


class MemoryLimiter:
    """Token buckets in this process. `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000):
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, _State] = {}

    def take(self, buckets: Sequence[Bucket], cost: float = 1.0) -> Refusal | None:
        """Charges `cost` tokens to every bucket, or to none (the longest wait wins)."""
        now = self.clock()
        states = []
        refusal: Refusal | None = None
        for b in buckets:
            state = self._buckets.get(b.key)
            if state is None:
                if len(self._buckets) >= self.max_buckets:
                    self._buckets.clear()  # bounded memory: forget idle buckets (they refill)
                state = self._buckets[b.key] = _State(b.limit.burst, now)
            elif now > state.updated_s:
                state.tokens = min(b.limit.burst,
                                   state.tokens + (now - state.updated_s) * b.limit.rate_per_s)
                state.updated_s = now
            states.append(state)
            if state.tokens < cost:
                wait_s = (cost - state.tokens) / b.limit.rate_per_s
                if cost > b.limit.burst:
                    wait_s = math.inf  # never fits: the batch is larger than the bucket
                if refusal is None or wait_s > refusal.retry_after_s:
                    refusal = Refusal(b.scope, wait_s)
        if refusal is None:
            for state in states:
                state.tokens -= cost
        return refusal


# Every bucket: refill by the time elapsed on Redis's own clock (TIME), then take `cost`
# from all of them or from none. KEYS: the buckets; ARGV: cost, then rate and burst per key.
# Returns {index of the refusing bucket (1-based; 0: granted), wait in microseconds}.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local tokens = {}
local worst, worst_wait = 0, 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local have, ts = tonumber(b[1]), tonumber(b[2])
  if have == nil or ts == nil then
    have = burst
  elseif now > ts then
    have = math.min(burst, have + (now - ts) * rate)
  end
  tokens[i] = have
  if have < cost then
    local wait = (cost - have) / rate
    if cost > burst then wait = 1e9 end
    if wait > worst_wait or worst == 0 then worst, worst_wait = i, wait end
  end
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local left = tokens[i]
  if worst == 0 then left = left - cost end
  redis.call('HSET', key, 'tokens', tostring(left), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {worst, math.ceil(worst_wait * 1000000)}
"""


class RedisLimiter:
    """Buckets in Redis, shared by every process using the same Redis and prefix. While
    Redis does not answer, the in-memory `fallback` decides (logged once per outage;
    Redis is tried again after `retry_s`): a limiter's store never fails a request."""

    def __init__(self, url: str, prefix: str = "meshserve:ratelimit", timeout_s: float = 0.25,
                 retry_s: float = 1.0, fallback: MemoryLimiter | None = None):
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)
        self.script = self.redis.register_script(TAKE_LUA)
        # One hash tag: every bucket of a request lives on one Redis Cluster slot.
        self.prefix = "{" + prefix + "}:"
        self.retry_s = retry_s
        self.fallback = fallback or MemoryLimiter()
        self._down_until = 0.0

    @property
    def degraded(self) -> bool:
        return self._down_until > 0.0

    async def take(self, buckets: Sequence[Bucket], cost: float = 1.0) -> Refusal | None:
        if not buckets:
            return None
        now = time.monotonic()
        if now < self._down_until:
            return self.fallback.take(buckets, cost)
        args: list[float] = [cost]
        for b in buckets:
            args += [b.limit.rate_per_s, b.limit.burst]
        try:
            index, wait_us = await self.script(
                keys=[self.prefix + b.key for b in buckets], args=args)
        except Exception as e:  # noqa: BLE001 - any store failure: local buckets decide
            if not self.degraded:
                log.warning("rate limiter: Redis unavailable (%s); in-memory buckets decide "
                            "until it answers again", e)
            self._down_until = now + self.retry_s
            return self.fallback.take(buckets, cost)
        if self.degraded:
            log.info("rate limiter: Redis answers again; buckets are shared again")
            self._down_until = 0.0
        if int(index) == 0:
            return None
        wait_s = int(wait_us) / 1e6
        return Refusal(buckets[int(index) - 1].scope, math.inf if wait_s >= 1e9 else wait_s)

    async def close(self) -> None:
        await self.redis.aclose()


class LocalLimiter:
    """The in-memory limiter behind the same awaitable interface as RedisLimiter."""

    def __init__(self, memory: MemoryLimiter | None = None):
        self.memory = memory or MemoryLimiter()

    async def take(self, buckets: Sequence[Bucket], cost: float = 1.0) -> Refusal | None:
        return self.memory.take(buckets, cost) if buckets else None

    async def close(self) -> None:
        return None
