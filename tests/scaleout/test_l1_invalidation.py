"""Each gateway keeps hot results in an in-process L1; a reload through ANY gateway empties
every gateway's L1 (the cache service announces invalidations on every lookup stream), so
no gateway serves a result computed before the reload."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np

from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import MODELS

INTERNAL = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]


def request(x: np.ndarray) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="digits", model_version="2")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(x.tobytes())
    return r


def l1_hits(gateway) -> float:
    url = f"http://127.0.0.1:{gateway.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("meshserve_gateway_l1_hits_total "):
                return float(line.split()[1])
    raise AssertionError("no meshserve_gateway_l1_hits_total")


def test_a_reload_through_one_gateway_empties_the_other_gateways_l1(start_service):
    worker = start_service("model_worker", [*INTERNAL, "--device", "cpu", "--load", "digits",
                                            "--model-repository", str(MODELS)])
    cache = start_service("cache", INTERNAL)
    batcher = start_service("batcher", [*INTERNAL, "--model-repository", str(MODELS),
                                        "--load", "digits", "--workers", worker.address])
    gateways = [start_service("gateway", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--model-repository", str(MODELS), "--batcher", batcher.address,
        "--cache", cache.address]) for _ in range(2)]
    x = np.random.default_rng(7).random((1, 64), dtype=np.float32)

    async def main() -> None:
        channels = [grpc.aio.insecure_channel(g.address) for g in gateways]
        a, b = (pb_grpc.GRPCInferenceServiceStub(c) for c in channels)
        try:
            first = await a.ModelInfer(request(x), timeout=30)
            assert not first.parameters["cache_hit"].bool_param
            for _ in range(200):  # the store is asynchronous: a hit once it has landed
                again = await a.ModelInfer(request(x), timeout=30)
                if again.parameters["cache_hit"].bool_param:
                    break
                await asyncio.sleep(0.02)
            assert again.parameters["cache_hit"].bool_param
            assert again.raw_output_contents == first.raw_output_contents
            # gateway B finds it in the cache service; it had sent the request to the
            # batcher meanwhile (misses are mostly all there is), and withdraws it: not a
            # failure in the statistics
            from_b = await b.ModelInfer(request(x), timeout=30)
            assert from_b.parameters["cache_hit"].bool_param
            assert from_b.raw_output_contents == first.raw_output_contents
            stats = await b.ModelStatistics(
                pb.ModelStatisticsRequest(name="digits", version="2"), timeout=30)
            assert stats.model_stats[0].inference_stats.fail.count == 0
            # hits now come from gateway A's L1 ...
            hits = l1_hits(gateways[0])
            assert (await a.ModelInfer(request(x), timeout=30)).parameters["cache_hit"].bool_param
            assert l1_hits(gateways[0]) == hits + 1
            await b.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"),
                                        timeout=60)
            # ... and a reload through gateway B empties it: A computes again
            for _ in range(200):
                after = await a.ModelInfer(request(x), timeout=30)
                if not after.parameters["cache_hit"].bool_param:
                    break
                # the announcement travels asynchronously; never more than a moment
                await asyncio.sleep(0.02)
            assert not after.parameters["cache_hit"].bool_param
            assert after.raw_output_contents == first.raw_output_contents
        finally:
            for c in channels:
                await c.close()

    asyncio.run(main())
