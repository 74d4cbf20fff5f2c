"""Where runtime routing policies live, shared by every gateway, and their wire form.

- RedisPolicyStore (the gateway has --redis-url): serialized meshserve.v1.RoutingPolicy in
  one hash, a pub/sub message per change; each gateway re-reads the changed field (and the
  whole hash after a reconnect). Survives gateway restarts.
- BatcherPolicyStore (no Redis): the batcher's meshserve.v1.RoutingStore service, watched
  over one long-lived server stream (a snapshot, then each change).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis

from meshserve.common import grpcutil
from meshserve.common.logs import redact_url
from meshserve.common.shared_state import (
    Synced,
    put_redis,
    start_watch,
    stop,
    watch_redis,
    watch_stream,
)
from meshserve.common.transport import Transport
from meshserve.gateway.routing import AliasSpec, Policy, Target
from meshserve.gateway.traffic import PolicyStore
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

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


def _parse(data: bytes) -> Policy:
    return policy_from_pb(rpb.RoutingPolicy.FromString(data))


# ---------------------------------------------------------------------------- Redis


class RedisPolicyStore(PolicyStore):
    def __init__(self, url: str, start_wait_s: float = 5.0):
        self.url = url
        self.redis = aioredis.from_url(url)
        self.start_wait_s = start_wait_s
        self._task: asyncio.Task | None = None

    async def start(self, apply: Apply) -> None:
        self.synced = Synced(apply)
        self._task = await start_watch(self._watch(), self.synced, self.start_wait_s,
                                       "routing policies", f"Redis at {redact_url(self.url)}")

    async def put(self, policy: Policy) -> None:
        await put_redis(self.redis, REDIS_HASH, REDIS_CHANNEL, policy.model,
                        policy_to_pb(policy).SerializeToString())

    async def delete(self, model: str) -> None:
        await put_redis(self.redis, REDIS_HASH, REDIS_CHANNEL, model, None)

    async def _watch(self) -> None:
        await watch_redis(self.redis, REDIS_HASH, REDIS_CHANNEL, self.synced, _parse,
                          "routing policy")

    async def close(self) -> None:
        await stop(self._task)
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
        self.synced = Synced(apply)
        self._task = await start_watch(self._watch(), self.synced, self.start_wait_s,
                                       "routing policies", f"the batcher at {self.target}")

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
        await watch_stream(lambda: self.stub.Watch(rpb.WatchPoliciesRequest()), self.synced,
                           lambda change: policy_from_pb(change.policy), "routing policies")

    async def close(self) -> None:
        await stop(self._task)
        if self._channel is not None:
            await self._channel.close()
