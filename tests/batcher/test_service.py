"""The batcher through real gRPC, with real model worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.batcher.client import BatcherClient
from meshserve.batcher.config import Settings
from meshserve.batcher.server import create_server
from meshserve.common.errors import InvalidInput, NotFound, Unavailable
from meshserve.common.tensors import from_pb, to_pb
from meshserve.pb.meshserve.v1 import batcher_pb2, batcher_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def worker_args(models_dir, load="digits") -> list[str]:
    return ["--port", "0", "--metrics-port", "-1", "--device", "cpu",
            "--model-repository", str(models_dir), "--load", load]


@contextlib.asynccontextmanager
async def running_batcher(models_dir, workers: list[str], wait_s: float = 20, **overrides):
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, workers=tuple(workers),
                        model_repository=str(models_dir), **overrides)
    server, port, runtime = await create_server(settings)
    await runtime.startup(settings.load, wait_s=wait_s)
    client = BatcherClient(f"127.0.0.1:{port}")
    await client.start()
    try:
        yield client, runtime, port
    finally:
        await client.close()
        await server.stop(None)
        await runtime.close()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32)


def reference(version: str, x: np.ndarray) -> np.ndarray:
    model = torch.jit.load(f"models/digits/{version}/model.pt")
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def outputs_of(result) -> dict[str, np.ndarray]:
    return {t.name: from_pb(t) for t in result.outputs}


def test_500_concurrent_requests_get_exact_answers_in_batches(start_service, models_dir):
    worker = start_service("model_worker", worker_args(models_dir))
    x = rows(500)
    expected = reference("2", x)

    async def body():
        async with running_batcher(models_dir, [worker.address]) as (client, _rt, _port):
            results = await asyncio.gather(*(
                client.infer("digits", "2", [to_pb("input", x[i : i + 1])], [], 0, 30.0)
                for i in range(500)
            ))
            stats = await client.statistics("digits", "2")
            return results, stats

    results, stats = asyncio.run(body())
    logits = np.concatenate([outputs_of(r)["logits"] for r in results])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    predictions = np.concatenate([outputs_of(r)["predictions"] for r in results])
    assert (predictions == expected.argmax(axis=1)).all()
    probabilities = np.concatenate([outputs_of(r)["probabilities"] for r in results])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert all(r.batch_size >= 1 and r.compute_ns > 0 for r in results)
    [m] = stats.models
    assert m.inference_count == 500 and m.success.count == 500
    assert m.inference_count / m.execution_count > 1, "requests were not batched"
    assert max(r.batch_size for r in results) > 1
    assert sum(b.compute_infer.count for b in m.batch_stats) == m.execution_count


def test_two_gateways_with_different_output_filters_get_their_own_rows(start_service,
                                                                      models_dir):
    """Two clients (two gateways' streams) at once on one batcher: their requests are
    batched together (test_result_blocks.py pins the shared batch down), each answered
    with its own rows of the outputs it asked for."""
    worker = start_service("model_worker", worker_args(models_dir))
    x = rows(120, seed=3)
    expected = reference("2", x)

    async def body():
        async with running_batcher(models_dir, [worker.address]) as (first, _rt, port):
            second = BatcherClient(f"127.0.0.1:{port}")
            await second.start()
            try:
                results = await asyncio.gather(*(
                    (first, second)[i % 2].infer(
                        "digits", "2", [to_pb("input", x[i:i + 1 + i % 3])],
                        ["logits"] if i % 2 else ["predictions", "probabilities"], 0, 30.0)
                    for i in range(0, 120, 3)))
                # Results counted on the hop metric as requests (blocks carry several).
                assert (first.received.items, second.received.items) == (20, 20)
                return results
            finally:
                await second.close()

    results = asyncio.run(body())
    assert max(r.batch_size for r in results) > 1, "nothing was batched"
    for i, r in zip(range(0, 120, 3), results, strict=True):
        got = outputs_of(r)
        n = 1 + i % 3
        if i % 2:
            assert list(got) == ["logits"]
            np.testing.assert_allclose(got["logits"], expected[i:i + n], rtol=1e-4, atol=1e-5)
        else:
            assert sorted(got) == ["predictions", "probabilities"]
            assert (got["predictions"] == expected[i:i + n].argmax(axis=1)).all()
            assert got["probabilities"].shape == (n, 10)


def test_killing_one_of_two_workers_under_load_loses_and_duplicates_nothing(
        start_service, models_dir):
    w1 = start_service("model_worker", worker_args(models_dir, "digits:2"))
    w2 = start_service("model_worker", worker_args(models_dir, "digits:2"))
    total = 3000
    x = rows(1)

    async def body():
        async with running_batcher(models_dir, [w1.address, w2.address]) as (_c, runtime, port):
            limit = time.monotonic() + 20
            while len(runtime.pool.holders(("digits", "2"))) < 2 and time.monotonic() < limit:
                await runtime.pool.wait_change(1.0)
            assert len(runtime.pool.holders(("digits", "2"))) == 2
            answered: Counter[int] = Counter()
            codes: Counter[int] = Counter()
            sent = asyncio.Event()
            half = asyncio.Event()

            async def requests():
                # Waves of 100 requests; the writer is never more than 300 ahead.
                for start in range(0, total, 100):
                    while start - sum(answered.values()) > 300:
                        await asyncio.sleep(0.001)
                    yield batcher_pb2.InferRequests(requests=[
                        batcher_pb2.InferRequest(request_id=i, model="digits", version="2",
                                                 inputs=[to_pb("input", x)], timeout_us=0)
                        for i in range(start, start + 100)
                    ])
                sent.set()
                await half.wait()

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = batcher_pb2_grpc.BatcherStub(channel).Infer(requests())
                killed = False
                async for message in call:
                    for r in message.results:
                        answered[r.request_id] += 1
                        codes[r.code] += 1
                    if not killed and sum(answered.values()) >= total // 4:
                        w1.kill()  # SIGKILL with batches in flight
                        killed = True
                    if sum(answered.values()) >= total:
                        half.set()
                        break
                call.cancel()
            return answered, codes, runtime.pool.holders(("digits", "2"))

    answered, codes, holders = asyncio.run(body())
    assert set(answered) == set(range(total))
    assert set(answered.values()) == {1}, "a request was answered twice"
    assert codes == {0: total}, codes
    assert [w.address for w in holders] == [w2.address]


def test_unavailable_with_a_clear_message_when_no_worker_serves(models_dir, free_port_):
    async def body():
        # A worker address nobody listens on.
        async with running_batcher(models_dir, [f"127.0.0.1:{free_port_}"], wait_s=0) as (client, _r, port):
            with pytest.raises(Unavailable, match="no model worker is serving digits version 2"):
                await client.infer("digits", "2", [to_pb("input", rows(1))], [], 0, 5.0)
            states = await client.model_states("digits")
            assert {s.version: s.state for s in states.versions} == {
                "1": "UNAVAILABLE", "2": "UNAVAILABLE"}
            assert "no model worker is connected" in states.versions[0].reason
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="meshserve.v1.Batcher"))
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    asyncio.run(body())


@pytest.fixture
def free_port_():
    from tests.conftest import free_port
    return free_port()


def test_model_states_statistics_load_and_unload(start_service, models_dir):
    worker = start_service("model_worker", worker_args(models_dir, "digits:2"))
    x = rows(3, seed=7)

    async def body():
        async with running_batcher(models_dir, [worker.address]) as (client, _rt, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="meshserve.v1.Batcher"))
                assert health.status == health_pb2.HealthCheckResponse.SERVING

            states = {s.version: s for s in (await client.model_states("digits")).versions}
            assert states["2"].state == "READY" and list(states["2"].workers) == [worker.address]
            assert states["1"].state == "UNAVAILABLE"
            assert states["1"].reason == "not loaded on any model worker"

            # Not wanted: version 1 is not loaded on demand.
            with pytest.raises(Unavailable, match="model digits version 1 is not loaded"):
                await client.infer("digits", "1", [to_pb("input", x)], [], 0, 5.0)

            loaded = await client.load_model("digits", ["1"])
            [v1] = loaded.versions
            assert (v1.version, v1.state, list(v1.workers)) == ("1", "READY", [worker.address])
            r = await client.infer("digits", "1", [to_pb("input", x)], ["predictions"], 0, 5.0)
            assert [t.name for t in r.outputs] == ["predictions"]
            assert (from_pb(r.outputs[0]) == reference("1", x).argmax(axis=1)).all()
            assert r.batch_size == 3

            unloaded = await client.unload_model("digits", ["1"])
            assert [(s.version, s.state, s.reason) for s in unloaded.versions] == [
                ("1", "UNAVAILABLE", "unloaded")]
            with pytest.raises(Unavailable, match="model digits version 1 is not loaded"):
                await client.infer("digits", "1", [to_pb("input", x)], [], 0, 5.0)

            # Bad requests are refused at intake.
            with pytest.raises(NotFound):
                await client.infer("nosuch", "1", [to_pb("input", x)], [], 0, 5.0)
            with pytest.raises(InvalidInput, match="max_batch_size 64"):
                await client.infer("digits", "2", [to_pb("input", rows(65))], [], 0, 5.0)
            with pytest.raises(InvalidInput, match="takes inputs"):
                await client.infer("digits", "2", [to_pb("other", x)], [], 0, 5.0)
            with pytest.raises(NotFound):
                await client.load_model("nosuch")

            for i in range(4):
                await client.infer("digits", "2", [to_pb("input", x[: i % 3 + 1])], [], 0, 5.0)
            stats = {m.version: m for m in (await client.statistics("digits")).models}
            return stats

    stats = asyncio.run(body())
    s2 = stats["2"]
    assert s2.inference_count == 1 + 2 + 3 + 1
    assert s2.execution_count == 4 and s2.success.count == 4
    assert s2.fail.count == 2  # the oversized request and the one with a wrong input name
    assert s2.compute_infer.count == 4 and s2.compute_infer.ns > 0
    assert s2.queue.count == 4 and s2.last_inference_ms > time.time() * 1000 - 60_000
    assert sum(b.compute_infer.count for b in s2.batch_stats) == 4
    s1 = stats["1"]
    assert s1.inference_count == 3 and s1.execution_count == 1
    assert s1.fail.count == 2  # the two UNAVAILABLE answers


def test_adaptive_mode_answers_exactly_and_learns_a_profile(start_service, models_dir):
    worker = start_service("model_worker", worker_args(models_dir, "digits:2"))
    x = rows(300, seed=3)
    expected = reference("2", x).argmax(axis=1)

    async def body():
        async with running_batcher(models_dir, [worker.address], adaptive=True) as (
                client, runtime, _port):
            results = []
            for wave in range(3):
                results += await asyncio.gather(*(
                    client.infer("digits", "2", [to_pb("input", x[i : i + 1])],
                                 ["predictions"], 0, 30.0)
                    for i in range(wave * 100, wave * 100 + 100)
                ))
            [w] = runtime.pool.holders(("digits", "2"))
            return results, w.profile(("digits", "2")).measured()

    results, profile = asyncio.run(body())
    predictions = np.concatenate([from_pb(r.outputs[0]) for r in results])
    assert (predictions == expected).all()
    assert profile and all(v > 0 for v in profile.values())


def test_dns_entries_resolve_to_every_address():
    from meshserve.common.grpcutil import every_address, resolve_dns

    addresses = asyncio.run(resolve_dns("dns:///localhost:8021"))
    assert "127.0.0.1:8021" in addresses
    every = asyncio.run(every_address("dns:///localhost:8021"))
    assert ("127.0.0.1:8021", "localhost") in every
    assert asyncio.run(every_address("a:1, b:2")) == [("a:1", ""), ("b:2", "")]
    assert asyncio.run(every_address("ipv4:10.0.0.1:1,10.0.0.2:1")) == [
        ("10.0.0.1:1", ""), ("10.0.0.2:1", "")]
