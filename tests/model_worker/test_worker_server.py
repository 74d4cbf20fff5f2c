"""The worker through real gRPC: an in-process grpc.aio server on port 0, and the worker
as its own process (python -m meshserve.model_worker)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from worker_models import run_async

from meshserve.common import grpcutil, tensors
from meshserve.model_worker import server as worker_server
from meshserve.model_worker.config import Settings
from meshserve.pb.meshserve.v1 import worker_pb2, worker_pb2_grpc

OK = grpc.StatusCode.OK.value[0]


def batch(batch_id, x, model="digits", version="1", outputs=(), name="input"):
    return worker_pb2.Batch(batch_id=batch_id, model=model, version=version,
                            inputs=[tensors.to_pb(name, x)], outputs=list(outputs))


def digits_input(rows, seed=0):
    return (np.random.default_rng(seed).random((rows, 64)) * 16).astype(np.float32)


def reference(models_dir, version, x):
    net = torch.jit.load(str(models_dir / "digits" / version / "model.pt")).eval()
    with torch.inference_mode():
        return net(torch.from_numpy(x)).numpy()


class Running:
    """An in-process worker server and a stub to it."""

    def __init__(self, repo, **settings):
        self.settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, device="cpu",
                                 model_repository=str(repo), worker_id="test-worker",
                                 **settings)

    async def __aenter__(self):
        self.server, self.port, self.worker, _ = await worker_server.start(self.settings)
        self.channel = grpcutil.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(1)
        self.worker.close()


async def execute(stub, *requests):
    """Sends every request, then collects every result by batch id."""
    async def send():
        for batches in requests:
            yield worker_pb2.ExecuteRequest(batches=batches)

    results, messages = {}, 0
    async for response in stub.Execute(send(), timeout=60):
        messages += 1
        for r in response.results:
            assert r.batch_id not in results, "answered twice"
            results[r.batch_id] = r
    return results, messages


def outputs_of(result):
    return {t.name: tensors.from_pb(t) for t in result.outputs}


@run_async
async def test_batches_give_exactly_the_torchscript_numbers(models_dir):
    async with Running(models_dir, load=("digits",)) as w:
        x1, x2, x3 = digits_input(5, 1), digits_input(64, 2), digits_input(1, 3)
        results, _ = await execute(
            w.stub,
            [batch(1, x1, version="1"), batch(2, x2, version="2")],  # several per request
            [batch(3, x3, version="2")],
        )
        assert sorted(results) == [1, 2, 3]
        for bid, x, version in [(1, x1, "1"), (2, x2, "2"), (3, x3, "2")]:
            r = results[bid]
            assert r.code == OK and r.executed_batch_size == len(x) and r.compute_ns > 0
            out = outputs_of(r)
            expected = reference(models_dir, version, x)
            assert list(out) == ["logits", "probabilities", "predictions"]
            np.testing.assert_array_equal(out["logits"], expected)
            np.testing.assert_array_equal(
                out["probabilities"], torch.softmax(torch.from_numpy(expected), -1).numpy())
            assert out["predictions"].dtype == np.int64 and out["predictions"].shape == (len(x),)
            np.testing.assert_array_equal(out["predictions"], expected.argmax(1))


@run_async
async def test_many_batches_in_flight_each_answered_once(models_dir):
    async with Running(models_dir, load=("digits:2",), max_in_flight=3) as w:
        xs = {i: digits_input(1 + i % 9, i) for i in range(1, 41)}
        requests = [[batch(i, xs[i], version="2", outputs=["predictions"])
                     for i in range(start, start + 4)] for start in range(1, 41, 4)]
        results, messages = await execute(w.stub, *requests)
        assert sorted(results) == list(range(1, 41)) and messages <= 40
        for i, r in results.items():
            assert r.code == OK and [t.name for t in r.outputs] == ["predictions"]
            np.testing.assert_array_equal(outputs_of(r)["predictions"],
                                          reference(models_dir, "2", xs[i]).argmax(1))


@run_async
async def test_a_bad_batch_gets_an_error_and_the_stream_keeps_serving(models_dir):
    x = digits_input(2)
    async with Running(models_dir, load=("digits:1",)) as w:
        wrong_bytes = batch(5, x)
        wrong_bytes.inputs[0].data = wrong_bytes.inputs[0].data[:-4]
        results, _ = await execute(w.stub, [
            batch(1, x, model="nope"),
            batch(2, x, version="2"),
            batch(3, x.astype(np.float64)),
            batch(4, x[:, :32]),
            wrong_bytes,
            batch(6, x, outputs=["nope"]),
        ], [batch(7, x)])
        codes = {i: grpc.StatusCode.INVALID_ARGUMENT.value[0] for i in (3, 4, 5, 6)}
        codes.update({1: grpc.StatusCode.NOT_FOUND.value[0], 2: grpc.StatusCode.NOT_FOUND.value[0],
                      7: OK})
        assert {i: r.code for i, r in results.items()} == codes
        assert results[1].message == "model nope version 1 is not loaded on worker test-worker"
        assert "datatype FP64, expected FP32" in results[3].message
        assert "shape [2, 32], expected [-1, 64]" in results[4].message
        assert "508 bytes of data, expected 512" in results[5].message
        assert "no output 'nope'" in results[6].message
        np.testing.assert_array_equal(outputs_of(results[7])["logits"],
                                      reference(models_dir, "1", x))


@run_async
async def test_a_client_that_goes_away_does_not_hurt_the_worker(models_dir):
    async with Running(models_dir, load=("digits:1",)) as w:
        queue: asyncio.Queue = asyncio.Queue()

        async def send():
            while True:
                yield await queue.get()

        call = w.stub.Execute(send())
        for i in range(6):
            queue.put_nowait(worker_pb2.ExecuteRequest(batches=[batch(i, digits_input(64, i))]))
        await call.read()
        call.cancel()
        results, _ = await execute(w.stub, [batch(9, digits_input(3))])
        assert results[9].code == OK
        status = await w.stub.Status(worker_pb2.StatusRequest())
        for _ in range(100):  # in-flight work of the dropped stream drains
            if status.in_flight == 0:
                break
            await asyncio.sleep(0.05)
            status = await w.stub.Status(worker_pb2.StatusRequest())
        assert status.in_flight == 0


@run_async
async def test_watch_status_reports_a_load_and_an_unload(tiny_repo):
    async with Running(tiny_repo, max_models=2) as w:
        watch = w.stub.WatchStatus(worker_pb2.StatusRequest())
        first = await watch.read()
        assert first.worker_id == "test-worker" and first.device == "cpu"
        assert list(first.models) == [] and first.max_models == 2
        loaded = await w.stub.Load(worker_pb2.LoadRequest(model="tiny", version="1"))
        assert loaded.model.state == "READY" and loaded.model.byte_size > 0
        assert [b.batch_size for b in loaded.model.warmup] == [1, 2, 4, 8]
        loading, ready = await watch.read(), await watch.read()
        assert [(m.model, m.version, m.state) for m in loading.models] == [("tiny", "1", "LOADING")]
        assert [(m.model, m.state) for m in ready.models] == [("tiny", "READY")]
        assert ready.memory_used_bytes == loaded.model.byte_size
        await w.stub.Unload(worker_pb2.UnloadRequest(model="tiny", version="1"))
        assert list((await watch.read()).models) == []
        # eviction is a change too
        await w.stub.Load(worker_pb2.LoadRequest(model="tiny", version="1"))
        await w.stub.Load(worker_pb2.LoadRequest(model="tiny", version="2"))
        await w.stub.Load(worker_pb2.LoadRequest(model="digits", version="1"))
        states = [[(m.model, m.version, m.state) for m in (await watch.read()).models]
                  for _ in range(7)]
        assert ("tiny", "1", "READY") not in states[-1] and len(states[-1]) == 2
        watch.cancel()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.stub.Load(worker_pb2.LoadRequest(model="nope", version="1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.stub.Unload(worker_pb2.UnloadRequest(model="tiny", version="1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.stub.Load(worker_pb2.LoadRequest(model="../tiny", version="1"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@run_async
async def test_a_load_evicts_the_idle_least_recently_used_model(tiny_repo):
    async with Running(tiny_repo, load=("tiny:1",), max_models=1) as w:
        async def send():
            yield worker_pb2.ExecuteRequest(batches=[batch(1, np.ones((2, 4), np.float32),
                                                           model="tiny", name="x")])
        # while tiny:1 has no batch in flight it is evicted for tiny:2
        await w.stub.Load(worker_pb2.LoadRequest(model="tiny", version="2"))
        status = await w.stub.Status(worker_pb2.StatusRequest())
        assert [m.version for m in status.models] == ["2"]
        results = {r.batch_id: r async for resp in w.stub.Execute(send()) for r in resp.results}
        assert results[1].code == grpc.StatusCode.NOT_FOUND.value[0]


@run_async
async def test_top_k_through_grpc(tiny_repo):
    async with Running(tiny_repo, load=("tiny:2",)) as w:
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        results, _ = await execute(w.stub, [batch(1, x, model="tiny", version="2", name="x",
                                                   outputs=["top_p", "top_idx", "label"])])
        out = outputs_of(results[1])
        assert list(out) == ["label", "top_idx", "top_p"]
        assert out["top_idx"].shape == (3, 2) and out["top_p"].dtype == np.float32
        np.testing.assert_array_equal(out["top_idx"][:, 0], out["label"])
        assert (out["top_p"][:, 0] >= out["top_p"][:, 1]).all()


def test_worker_process_serves_after_warming_and_stops_on_sigterm(start_service, models_dir):
    proc = start_service("model_worker", [
        "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1", "--device", "cpu",
        "--model-repository", str(models_dir), "--load", "digits",
    ])

    async def check():
        async with grpcutil.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="meshserve.v1.ModelWorker"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = worker_pb2_grpc.ModelWorkerStub(channel)
            status = await stub.Status(worker_pb2.StatusRequest(), timeout=10)
            assert sorted((m.version, m.state) for m in status.models) == [
                ("1", "READY"), ("2", "READY")]
            x = digits_input(7, 5)
            results, _ = await execute(stub, [batch(1, x, version="2")])
            np.testing.assert_array_equal(outputs_of(results[1])["logits"],
                                          reference(models_dir, "2", x))

    asyncio.run(check())
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{proc.ports['metrics']}/metrics", timeout=10).read().decode()
    for name in ("meshserve_worker_batch_size", "meshserve_worker_compute_seconds",
                 "meshserve_worker_models_loaded 2.0", "meshserve_worker_model_load_seconds"):
        assert name in text
    assert 'meshserve_worker_compute_seconds_count{model="digits",version="2"} 1.0' in text
    assert proc.stop() == 0


def test_bad_flags_fail_fast(start_service, models_dir):
    proc = start_service("model_worker", ["--port", "0", "--max-in-flight", "0"], wait=False)
    assert proc.proc.wait(60) == 2
    assert "--max-in-flight must be >= 1" in proc.output()
