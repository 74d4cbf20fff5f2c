"""Rate limits and load shedding on real gateway processes: per key and per model, shared
by two gateways through Redis, the in-memory fallback when Redis is down, concurrency."""

from __future__ import annotations

import asyncio
import time

import grpc

from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.protection.conftest import bearer, infer_request, metric, write_keys


async def burst_of(addresses: list[str], count: int, metadata=None) -> tuple[list, float]:
    """`count` ModelInfer calls one after the other, spread over the gateways;
    [(code, details, retry-after-ms or None)] and the seconds they took."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    outcomes = []
    started = time.monotonic()
    try:
        for i in range(count):
            call = stubs[i % len(stubs)].ModelInfer(infer_request(), metadata=metadata, timeout=30)
            try:
                await call
                outcomes.append((grpc.StatusCode.OK, "", None))
            except grpc.aio.AioRpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                retry = trailing.get("retry-after-ms")
                outcomes.append((e.code(), e.details(), int(retry) if retry else None))
    finally:
        elapsed = time.monotonic() - started
        for c in channels:
            await c.close()
    return outcomes, elapsed


def admitted_within(outcomes, elapsed, rate, burst) -> int:
    ok = sum(code == grpc.StatusCode.OK for code, _, _ in outcomes)
    # the burst at once, plus what refilled while the calls ran
    assert burst <= ok <= burst + int(elapsed * rate) + 1, (ok, elapsed, outcomes)
    return ok


def check_refusals(outcomes, rate):
    refused = [o for o in outcomes if o[0] != grpc.StatusCode.OK]
    assert refused
    for code, details, retry_ms in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert retry_ms is not None and 0 < retry_ms <= 1000 / rate + 1, retry_ms
        assert f"retry after {retry_ms} ms" in details


def test_a_keys_rate_admits_its_burst_then_refuses_with_a_retry_delay(start_gateway, tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, {"name": "slow", "key": "key-slow", "models": ["*"],
                      "rate_per_s": 0.5, "burst": 4},
               {"name": "free", "key": "key-free", "models": ["*"]})
    g = start_gateway("--api-keys-file", str(keys))
    outcomes, elapsed = asyncio.run(burst_of([g.address], 10, bearer("key-slow")))
    admitted_within(outcomes, elapsed, 0.5, 4)
    check_refusals(outcomes, 0.5)
    assert "API key 'slow'" in outcomes[-1][1]
    # another key has its own bucket (and no limit)
    outcomes, _ = asyncio.run(burst_of([g.address], 6, bearer("key-free")))
    assert all(code == grpc.StatusCode.OK for code, _, _ in outcomes)
    assert metric(g, "meshserve_gateway_rate_limited_total", 'scope="key"') >= 5


def test_a_models_rate_without_auth_and_on_a_stream(start_gateway):
    g = start_gateway("--model-rate-limits", "digits=0.2:3")
    outcomes, elapsed = asyncio.run(burst_of([g.address], 5))
    admitted_within(outcomes, elapsed, 0.2, 3)
    check_refusals(outcomes, 0.2)

    async def stream():
        async with grpc.aio.insecure_channel(g.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return [r async for r in stub.ModelStreamInfer(
                iter([infer_request("digits", str(i)) for i in range(2)]), timeout=30)]

    responses = asyncio.run(stream())
    assert len(responses) == 2
    for r in responses:
        assert "rate limit of the model exceeded" in r.error_message
        assert r.infer_response.parameters["retry_after_ms"].int64_param > 0
    assert metric(g, "meshserve_gateway_rate_limited_total", 'scope="model"') >= 4


def test_two_gateways_share_one_bucket_through_redis(start_gateway, redis_server, tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, {"name": "shared", "key": "key-shared", "models": ["digits"],
                      "rate_per_s": 0.2, "burst": 6})
    flags = ("--api-keys-file", str(keys), "--redis-url", redis_server.url)
    a, b = start_gateway(*flags), start_gateway(*flags)
    outcomes, elapsed = asyncio.run(burst_of([a.address, b.address], 16, bearer("key-shared")))
    # each gateway alone would admit 6: together they admit the one shared bucket's 6
    admitted_within(outcomes, elapsed, 0.2, 6)
    check_refusals(outcomes, 0.2)
    assert metric(a, "meshserve_gateway_rate_limited_total", 'scope="key"') >= 1
    assert metric(b, "meshserve_gateway_rate_limited_total", 'scope="key"') >= 1


def test_redis_down_the_limits_hold_in_memory_and_requests_never_fail(start_gateway,
                                                                     redis_server):
    g = start_gateway("--redis-url", redis_server.url, "--model-rate-limits", "digits=0.2:3",
                      "--grace-s", "1")
    redis_server.stop()
    outcomes, elapsed = asyncio.run(burst_of([g.address], 6))
    assert {code for code, _, _ in outcomes} <= {grpc.StatusCode.OK,
                                                grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    admitted_within(outcomes, elapsed, 0.2, 3)
    check_refusals(outcomes, 0.2)
    assert "rate limiter: Redis unavailable" in g.output()
    redis_server.start()  # for a quick, clean stop of the gateway


def test_past_the_concurrency_limit_requests_are_shed_at_once(start_gateway):
    g = start_gateway("--max-concurrent-requests", "1")

    async def main():
        async with grpc.aio.insecure_channel(g.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(infer_request(), timeout=30)  # connected and warm
            calls = [stub.ModelInfer(infer_request("digits", str(i)), timeout=30) for i in range(64)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert shed and len(shed) < len(results)
    for e in shed:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 requests in progress" in e.details()
    assert metric(g, "meshserve_gateway_rate_limited_total", 'scope="concurrency"') == len(shed)
    assert metric(g, "meshserve_gateway_inflight_requests") == 0
