"""Where runtime routing policies live, shared by every gateway, and their wire form.

- RedisPolicyStore (the gateway has --redis-url): serialized meshserve.v1.RoutingPolicy in
  one hash, a pub/sub message per change; each gateway re-reads the changed field (and the
  whole hash after a reconnect). Survives gateway restarts.
- BatcherPolicyStore (no Redis): the batcher's meshserve.v1.RoutingStore service, watched
  over one long-lived server stream (a snapshot, then each change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis

from meshserve.common import grpcutil
from meshserve.common.backoff import Backoff
from meshserve.common.logs import redact_url
from meshserve.common.transport import Transport
from meshserve.gateway.routing import AliasSpec, Policy, Target
from meshserve.gateway.traffic import PolicyStore
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)

REDIS_HASH = "meshserve:routing:policies"
REDIS_CHANNEL = "meshserve:routing:changes"

Apply = Callable[[str, Policy | None], None]


# ----------------------------------------------------------------------- converters


def target_to_pb(t: Target) -> rpb.RouteTarget:
    return rpb.RouteTarget(model=t.model, version=t.version)


def target_from_pb(t: rpb.RouteTarget) -> Target:
    return Target(t.model, t.version)


def policy_to_pb(p: Policy) -> rpb.RoutingPolicy:
    out = rpb.RoutingPolicy(
        model=p.model,
        split=[rpb.VersionWeight(version=v, weight=w) for v, w in p.split],
        shadow=[rpb.VersionWeight(version=v, weight=w) for v, w in p.shadow],
        fallback=[target_to_pb(t) for t in p.fallback],
        fallback_queue_us=p.fallback_queue_us,
        max_shadow_in_flight=p.max_shadow_in_flight,
        source=p.source, revision=p.revision, updated_unix_ms=p.updated_unix_ms,
    )
    if p.alias is not None:
        a = p.alias
        out.alias.CopyFrom(rpb.AliasPolicy(
            preferred=target_to_pb(a.preferred), cheaper=target_to_pb(a.cheaper),
            high_queue_us=a.high_queue_us, low_queue_us=a.low_queue_us,
            high_latency_us=a.high_latency_us, low_latency_us=a.low_latency_us,
            min_dwell_s=a.min_dwell_s,
        ))
    return out


def policy_from_pb(m: rpb.RoutingPolicy) -> Policy:
    alias = None
    if m.HasField("alias"):
        a = m.alias
        alias = AliasSpec(target_from_pb(a.preferred), target_from_pb(a.cheaper),
                          a.high_queue_us, a.low_queue_us, a.high_latency_us,
                          a.low_latency_us, a.min_dwell_s)
    return Policy(
        model=m.model,
        split=tuple((w.version, w.weight) for w in m.split),
        shadow=tuple((w.version, w.weight) for w in m.shadow),
        fallback=tuple(target_from_pb(t) for t in m.fallback),
        fallback_queue_us=m.fallback_queue_us,
        alias=alias,
        max_shadow_in_flight=m.max_shadow_in_flight,
        source=m.source or "runtime", revision=m.revision, updated_unix_ms=m.updated_unix_ms,
    )


def _decode(model: str, data: bytes | None) -> Policy | None:
    if data is None:
        return None
    try:
        return policy_from_pb(rpb.RoutingPolicy.FromString(data))
    except Exception as e:  # noqa: BLE001 - a corrupt entry is skipped, never fatal
        log.warning("stored routing policy of %s is unreadable: %s", model, e)
        return None


class _Synced:
    """Applies a full snapshot (removing models that vanished) or one change."""

    def __init__(self, apply: Apply):
        self.apply = apply
        self.known: set[str] = set()
        self.ready = asyncio.Event()

    def snapshot(self, entries: dict[str, Policy | None]) -> None:
        for model in self.known - set(entries):
            self.apply(model, None)
        self.known = {m for m, p in entries.items() if p is not None}
        for model, policy in entries.items():
            self.apply(model, policy)
        self.ready.set()

    def change(self, model: str, policy: Policy | None) -> None:
        (self.known.add if policy is not None else self.known.discard)(model)
        self.apply(model, policy)


# ---------------------------------------------------------------------------- Redis


class RedisPolicyStore(PolicyStore):
    def __init__(self, url: str, start_wait_s: float = 5.0):
        self.url = url
        self.redis = aioredis.from_url(url)
        self.start_wait_s = start_wait_s
        self._task: asyncio.Task | None = None

    async def start(self, apply: Apply) -> None:
        self.synced = _Synced(apply)
        self._task = asyncio.get_running_loop().create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.ready.wait(), self.start_wait_s)
        if not self.synced.ready.is_set():
            log.warning("routing policies: Redis at %s not answering yet; watching on",
                        redact_url(self.url))

    async def put(self, policy: Policy) -> None:
        data = policy_to_pb(policy).SerializeToString()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(REDIS_HASH, policy.model, data)
            pipe.publish(REDIS_CHANNEL, policy.model)
            await pipe.execute()

    async def delete(self, model: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(REDIS_HASH, model)
            pipe.publish(REDIS_CHANNEL, model)
            await pipe.execute()

    async def _watch(self) -> None:
        backoff = Backoff(max_s=2.0)
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(REDIS_CHANNEL)
                    # Subscribed first, then read: no change can fall between the two.
                    entries = await self.redis.hgetall(REDIS_HASH)
                    self.synced.snapshot({k.decode(): _decode(k.decode(), v)
                                          for k, v in entries.items()})
                    backoff.reset()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        model = message["data"].decode()
                        data = await self.redis.hget(REDIS_HASH, model)
                        self.synced.change(model, _decode(model, data))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect with a backoff
                log.warning("routing policies: Redis watch failed (%s); retrying", e)
                await backoff.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()


# -------------------------------------------------------------------------- batcher


class BatcherPolicyStore(PolicyStore):
    """The batcher's RoutingStore (with several batcher replicas, use Redis instead: each
    batcher holds its own store)."""

    def __init__(self, target: str, start_wait_s: float = 5.0, transport: Transport | None = None):
        self.target = target
        self.start_wait_s = start_wait_s
        self.transport = transport
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None

    async def start(self, apply: Apply) -> None:
        self._channel = grpcutil.channel(self.target, self.transport)
        self.stub = rpb_grpc.RoutingStoreStub(self._channel)
        self.synced = _Synced(apply)
        self._task = asyncio.get_running_loop().create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.ready.wait(), self.start_wait_s)
        if not self.synced.ready.is_set():
            log.warning("routing policies: the batcher at %s not answering yet; watching on",
                        self.target)

    async def _put(self, change: rpb.PolicyChange) -> None:
        try:
            await self.stub.Put(change, timeout=5.0)
        except grpc.aio.AioRpcError as e:
            raise grpcutil.error_from_rpc(e, f"the routing store at {self.target}") from None

    async def put(self, policy: Policy) -> None:
        await self._put(rpb.PolicyChange(model=policy.model, policy=policy_to_pb(policy)))

    async def delete(self, model: str) -> None:
        await self._put(rpb.PolicyChange(model=model, deleted=True))

    async def _watch(self) -> None:
        backoff = Backoff(max_s=2.0)
        while True:
            try:
                entries: dict[str, Policy | None] = {}
                in_snapshot = True
                async for change in self.stub.Watch(rpb.WatchPoliciesRequest()):
                    if in_snapshot:
                        if change.snapshot_done:
                            self.synced.snapshot(entries)
                            in_snapshot = False
                            backoff.reset()
                        else:
                            entries[change.model] = policy_from_pb(change.policy)
                        continue
                    policy = None if change.deleted else policy_from_pb(change.policy)
                    self.synced.change(change.model, policy)
                raise ConnectionError("the routing store closed the watch")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect with a backoff
                log.info("routing policies: batcher watch ended (%s); retrying", e)
                await backoff.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()
