"""The gateway's clients balance over several addresses: --batcher a,b spreads requests
over both batchers; --cache a,b shards keys over both caches."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from meshserve.batcher.client import BatcherClient
from meshserve.cache.client import CacheClient
from meshserve.cache.config import Settings as CacheSettings
from meshserve.cache.server import create_server as create_cache
from meshserve.common.grpcutil import split_targets
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.pb.meshserve.v1 import cache_pb2
from tests.conftest import MODELS

INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]


def test_split_targets():
    assert split_targets("127.0.0.1:1") == ["127.0.0.1:1"]
    assert split_targets("127.0.0.1:1, 127.0.0.1:2,") == ["127.0.0.1:1", "127.0.0.1:2"]
    # gRPC URIs stay one target (one channel, round_robin over what they name)
    assert split_targets("dns:///meshserve-batcher:8011") == ["dns:///meshserve-batcher:8011"]
    assert split_targets("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]


def test_gateway_spreads_requests_over_a_batcher_list(start_service):
    worker = start_service("model_worker", [*INTERNAL, "--device", "cpu", "--load", "digits",
                                            "--model-repository", str(MODELS)])
    batchers = [start_service("batcher", [*INTERNAL, "--model-repository", str(MODELS),
                                          "--load", "digits", "--workers", worker.address])
                for _ in range(2)]
    gateway = start_service("gateway", [
        *INTERNAL, "--model-repository", str(MODELS),
        "--batcher", ",".join(b.address for b in batchers)])

    async def main() -> list[int]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            rng = np.random.default_rng(0)
            for n in range(40):
                r = pb.ModelInferRequest(model_name="digits", id=str(n))
                r.inputs.add(name="input", datatype="FP32", shape=[1, 64])
                r.raw_input_contents.append(rng.random((1, 64), dtype=np.float32).tobytes())
                response = await stub.ModelInfer(r, timeout=30)
                assert response.id == str(n)
        counts = []
        for b in batchers:
            client = BatcherClient(b.address)
            await client.start()
            try:
                stats = await client.statistics("digits")
                counts.append(sum(s.inference_count for s in stats.models))
            finally:
                await client.close()
        return counts

    counts = asyncio.run(main())
    assert sum(counts) == 40
    assert all(c > 0 for c in counts), counts  # both batchers got requests


def key(n: int) -> cache_pb2.CacheKey:
    digest = np.random.default_rng(n).bytes(32)
    return cache_pb2.CacheKey(model="digits", version="1", digest=digest)


def test_cache_client_shards_keys_over_a_cache_list():
    async def main():
        servers = [await create_cache(CacheSettings(host="127.0.0.1", port=0, metrics_port=-1))
                   for _ in range(2)]
        client = CacheClient(",".join(f"127.0.0.1:{port}" for _, port, _, _ in servers),
                             timeout_s=5.0)
        await client.start()
        try:
            keys = [key(n) for n in range(64)]
            first = await client.lookup(keys)
            assert not any(r.hit for r in first)
            client.store([cache_pb2.StoreEntry(key=k, value=b"v%d" % n, generation=r.generation)
                          for n, (k, r) in enumerate(zip(keys, first, strict=True))])
            deadline = asyncio.get_running_loop().time() + 20
            while client.counters.stored < 64:
                assert asyncio.get_running_loop().time() < deadline, client.counters
                await asyncio.sleep(0.05)
            again = await client.lookup(keys)
            assert [r.value for r in again] == [b"v%d" % n for n in range(64)]
            one = [CacheClient(f"127.0.0.1:{port}") for _, port, _, _ in servers]
            for c in one:
                await c.start()
            per_server = [(await c.stats()).entries for c in one]
            for c in one:
                await c.close()
            assert sum(per_server) == 64 and all(n > 0 for n in per_server), per_server
            assert await client.invalidate("digits") == 64  # every shard is invalidated
        finally:
            await client.close()
            for server, _, _, cache in servers:
                await server.stop(None)
                await cache.close()
    asyncio.run(main())
