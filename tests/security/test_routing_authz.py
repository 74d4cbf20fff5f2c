"""Authorization everywhere a model is reached through routing: a key routes only between
models it may use, a served target pays its own rate limit, shadows take tokens, and the
shared policy store cannot smuggle in what the API refuses. Real processes: a worker, a
batcher, Redis and a gateway with keys."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis

from meshserve.client import AsyncClient
from meshserve.common.auth import ApiKey
from meshserve.common.ratelimit import RateLimit
from meshserve.gateway.protection import Protection
from meshserve.gateway.routing import AliasSpec, Policy, Target
from meshserve.gateway.routing_store import REDIS_CHANNEL, REDIS_HASH, policy_to_pb
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from tests.conftest import RedisServer, ServiceProcess
from tests.protection.conftest import X, infer_request, metric, write_keys
from tests.routing.conftest import make_repository

OPS = {"name": "ops", "key": "key-ops", "models": ["*"]}
# May use (and administer) digits and the alias name "mine", not digits_small.
NARROW = {"name": "narrow", "key": "key-narrow", "models": ["digits", "mine"]}
INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]


class Mesh:
    def __init__(self, tmp):
        self.tmp = tmp
        self.repo, _small = make_repository(tmp)
        self.redis = RedisServer(tmp)
        self.redis.start()
        self.worker = ServiceProcess("model_worker", [
            *INTERNAL, "--device", "cpu", "--threads", "1", "--model-repository",
            str(self.repo), "--load", "digits,digits_small"], tmp)
        self.worker.wait_ready()
        self.batcher = ServiceProcess("batcher", [
            *INTERNAL, "--model-repository", str(self.repo), "--workers",
            self.worker.address], tmp)
        self.batcher.wait_ready()
        self.keys = tmp / "keys.json"
        write_keys(self.keys, OPS, NARROW)
        self.gateways: list[ServiceProcess] = []

    def gateway(self, *flags: str) -> ServiceProcess:
        g = ServiceProcess("gateway", [
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--model-repository",
            str(self.repo), "--batcher", self.batcher.address, "--redis-url", self.redis.url,
            "--async-runners", "0", "--api-keys-file", str(self.keys), *flags], self.tmp,
            env={"REDIS_URL": ""})
        g.wait_ready()
        self.gateways.append(g)
        return g

    def stop(self):
        for p in [*self.gateways, self.batcher, self.worker]:
            p.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def shared_mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("routing-authz"))
    yield m
    m.stop()


@pytest.fixture
def mesh(shared_mesh):
    """The module's mesh with no runtime policy stored (each test starts its gateway)."""
    redis.Redis.from_url(shared_mesh.redis.url).delete(REDIS_HASH)
    return shared_mesh


def alias(preferred: str, cheaper: str) -> rpb.AliasPolicy:
    p_model, _, p_version = preferred.partition(":")
    c_model, _, c_version = cheaper.partition(":")
    return rpb.AliasPolicy(preferred=rpb.RouteTarget(model=p_model, version=p_version),
                           cheaper=rpb.RouteTarget(model=c_model, version=c_version),
                           high_queue_us=1_000_000)


def code(coro) -> grpc.StatusCode:
    try:
        asyncio.run(coro)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_a_key_for_a_cannot_route_a_to_b(mesh):
    g = mesh.gateway()

    async def main():
        async with AsyncClient(g.address, api_key="key-narrow") as narrow:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await narrow.route_set("digits", fallback=["digits_small"])
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "digits_small" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await narrow.route_set("mine", alias=alias("digits_small", "digits"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Its own models: allowed.
            await narrow.route_set("digits", fallback=["digits:1"])
            await narrow.route_set("mine", alias=alias("digits:2", "digits:1"))
            result = await narrow.infer("mine", {"input": X})
            assert result.outputs["predictions"].shape == (1,)

    asyncio.run(main())


def test_a_served_target_pays_its_own_rate_limit(mesh):
    """An alias to digits_small (1 token, no refill to speak of): the second request
    through the alias is refused by digits_small's bucket, its preferred and its cheaper
    target alike."""
    g = mesh.gateway("--model-rate-limits", "digits_small=0.001:1")

    async def main():
        async with AsyncClient(g.address, api_key="key-ops") as ops:
            await ops.route_set("cheap", alias=alias("digits_small", "digits_small:1"))
            first = await ops.infer("cheap", {"input": X})
            assert first.outputs["predictions"].shape == (1,)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ops.infer("cheap", {"input": X})
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(main())


def test_shadow_copies_take_tokens(mesh):
    """digits has 3 tokens; each request is mirrored to version 2. Request 1 and its
    shadow take two; request 2 takes the last (its shadow is dropped); request 3 is
    refused. Shadows that took nothing would let request 3 through."""
    g = mesh.gateway("--model-rate-limits", "digits=0.001:3")

    async def main():
        async with AsyncClient(g.address, api_key="key-ops") as ops:
            await ops.route_set("digits", split={"1": 100}, shadow={"2": 100})
            await ops.infer("digits", {"input": X}, use_cache=False)
            deadline = time.monotonic() + 30
            while not any(s.route == "shadow" and s.requests for s in
                          (await ops.route_get("digits")).stats):
                assert time.monotonic() < deadline, "the shadow never ran"
                await asyncio.sleep(0.05)
            await ops.infer("digits", {"input": X}, use_cache=False)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ops.infer("digits", {"input": X}, use_cache=False)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(main())
    assert metric(g, "meshserve_gateway_shadow_dropped_total", 'model="digits"') >= 1


def test_a_cyclic_alias_pushed_to_the_store_is_refused(mesh):
    """Written straight into Redis (as anything that can reach it could): the gateway
    takes the first alias and refuses the one closing the cycle, and an oversized policy;
    requests through the alias answer instead of recursing forever."""
    g = mesh.gateway()
    r = redis.Redis.from_url(mesh.redis.url)
    spec = {"high_queue_us": 1000, "low_queue_us": 500}
    a = Policy("a", alias=AliasSpec(Target("b"), Target("digits"), **spec), revision=1)
    b = Policy("b", alias=AliasSpec(Target("a"), Target("digits"), **spec), revision=1)
    big = Policy("digits", fallback=tuple(Target("digits", "1") for _ in range(1000)),
                 revision=1)
    for policy in (a, b, big):
        r.hset(REDIS_HASH, policy.model, policy_to_pb(policy).SerializeToString())
        r.publish(REDIS_CHANNEL, policy.model)

    async def main():
        async with AsyncClient(g.address, api_key="key-ops") as ops:
            deadline = time.monotonic() + 30
            while not (await ops.route_get("a")).has_policy:
                assert time.monotonic() < deadline, "the first alias never arrived"
                await asyncio.sleep(0.05)
            assert not (await ops.route_get("b")).has_policy
            assert not (await ops.route_get("digits")).has_policy
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ops.infer("a", {"input": X})
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # b: neither model nor alias

    asyncio.run(main())
    g.output()  # flushes the log
    log = g.log_path.read_text()
    assert "routing policy of b from the store refused: alias cycle: b -> a -> b" in log
    assert "routing policy of digits from the store refused: routing policy of 'digits': " \
        "1000 fallback entries, at most 4" in log


def test_the_keys_priority_is_a_floor():
    """A key with priority 2: a request without one, with 0 (the default) or with 1 (the
    highest) runs at 2; one asking for 3 (lower) keeps it."""
    p = Protection(None, {}, 10, registry=__import__("prometheus_client").CollectorRegistry())
    key = ApiKey("k", "0" * 64, frozenset(["*"]), priority=2, limit=RateLimit(100, 100))

    def run(asked):
        request = infer_request()
        if asked is not None:
            request.parameters["priority"].int64_param = asked
        assert asyncio.run(p.admit(key, [request])) is None
        return request.parameters["priority"].int64_param

    assert [run(a) for a in (None, 0, 1, 2, 3)] == [2, 2, 2, 2, 3]
    request = infer_request()
    request.parameters["priority"].string_param = "high"  # left to the servicer to refuse
    asyncio.run(p.admit(key, [request]))
    assert request.parameters["priority"] == pb.InferParameter(string_param="high")


def test_policy_sizes_are_bounded():
    from meshserve.common.errors import InvalidInput
    from meshserve.gateway.routing import MAX_FALLBACK, ModelFacts, validate

    facts = {"digits": ModelFacts(("1", "2"), (("input", "FP32", (64,)),))}.get
    ok = Policy("digits", fallback=tuple(Target("digits", "1") for _ in range(MAX_FALLBACK)))
    assert validate(ok, facts, {}).fallback == ok.fallback
    for bad, why in (
            (Policy("digits", split=(("1", 100.0),), max_shadow_in_flight=2**32),
             "max_shadow_in_flight must be in"),
            (Policy("digits", fallback=(Target("digits", "1"),) * (MAX_FALLBACK + 1)),
             "fallback entries, at most"),
            (Policy("digits", shadow=tuple((str(v), 1.0) for v in range(1, 10))),
             "shadow entries, at most"),
            (Policy("digits", split=(("1" * 500, 100.0),)), "is not a version")):
        with pytest.raises(InvalidInput, match=why):
            validate(bad, facts, {})


def test_the_batchers_routing_store_refuses_a_cyclic_alias(mesh):
    """The store gateways without Redis share: a Put closing an alias cycle (or naming
    1000 fallbacks) is INVALID_ARGUMENT; the first alias is kept."""
    from meshserve.pb.meshserve.v1 import routing_pb2_grpc as rpb_grpc

    spec = {"high_queue_us": 1000, "low_queue_us": 500}
    a = Policy("a", alias=AliasSpec(Target("b"), Target("digits"), **spec))
    b = Policy("b", alias=AliasSpec(Target("a"), Target("digits"), **spec))
    big = Policy("digits", fallback=(Target("digits", "1"),) * 1000)

    def put(policy):
        with grpc.insecure_channel(mesh.batcher.address) as channel:
            rpb_grpc.RoutingStoreStub(channel).Put(
                rpb.PolicyChange(model=policy.model, policy=policy_to_pb(policy)), timeout=10)

    put(a)
    for bad, why in ((b, "alias cycle: b -> a -> b"), (big, "1000 fallback entries")):
        with pytest.raises(grpc.RpcError) as e:
            put(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
