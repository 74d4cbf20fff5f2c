"""AsyncInference end to end, every service its own process, a real Redis: a standalone
runner SIGKILLed mid-way, another finishing the work exactly once; the in-memory mode;
Watch; errors; the command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshserve.client import AsyncClient, infer_request
from meshserve.pb.meshserve.v1 import async_inference_pb2 as apb
from meshserve.pb.meshserve.v1 import async_inference_pb2_grpc as apb_grpc
from tests.conftest import MODELS, ROOT, ServiceProcess
from tests.e2e.conftest import Mesh

SERVICE = "meshserve.v1.AsyncInference"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """The e2e mesh (its gateway: in-process task queue, one runner) plus a gateway on
    Redis with no runners of its own: runners are started by the tests."""
    tmp = tmp_path_factory.mktemp("tasks")
    m = Mesh(tmp)
    m.tmp = tmp
    m.redis_gateway = ServiceProcess("gateway", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
        "--model-repository", str(MODELS), "--batcher", m.batcher.address,
        "--cache", m.cache.address, "--redis-url", m.redis.url, "--async-runners", "0",
        "--async-max-queue", "250"], tmp)
    m.redis_gateway.wait_ready()
    yield m
    m.redis_gateway.stop()
    m.stop()


def runner(mesh, *flags: str) -> ServiceProcess:
    proc = ServiceProcess("tasks", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--redis-url",
        mesh.redis.url, "--model-repository", str(MODELS), "--batcher", mesh.batcher.address,
        "--cache", mesh.cache.address, "--concurrency", "1", "--claim-idle-s", "1", *flags],
        mesh.tmp)
    proc.wait_ready()
    return proc


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 1, 64)).astype(np.float32)


def test_reflection_lists_the_service(mesh):
    with grpc.insecure_channel(mesh.redis_gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
    assert SERVICE in [s.name for s in reply.list_services_response.service]


def test_killed_runner_every_task_finishes_exactly_once(mesh):
    r = redis.Redis.from_url(mesh.redis.url)
    x = rows(200, seed=1)

    async def submit():
        async with AsyncClient(mesh.redis_gateway.address) as client:
            ids = await client.submit_batch("digits", [{"input": row} for row in x])
            [never] = await client.submit_batch("digits", [{"input": x[0]}])
            assert (await client.cancel_task(never)).state == "CANCELLED"
            again = await client.submit("digits", {"input": x[1]}, idempotency_key="k1")
            assert await client.submit("digits", {"input": x[2]}, idempotency_key="k1") == again
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.submit_batch("digits", [{"input": row} for row in x[:60]])
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "201 tasks queued" in e.value.details() and "250" in e.value.details()
            return ids, never, again
    ids, never, again = asyncio.run(submit())

    def succeeded() -> int:
        with r.pipeline() as p:
            for tid in ids:
                p.hget(f"meshserve:tasks:task:{tid}", "state")
            return sum(1 for s in p.execute() if s == b"3")

    first = runner(mesh)
    deadline = time.monotonic() + 30
    while succeeded() < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.kill()  # SIGKILL, mid-way
    done_at_kill = succeeded()
    assert 40 <= done_at_kill < 200, "the runner was not stopped mid-way"
    second = runner(mesh)

    async def collect():
        async with AsyncClient(mesh.redis_gateway.address) as client:
            async def watch(tid):
                return [t async for t in client.watch_task(tid)]
            results = await asyncio.wait_for(asyncio.gather(*(watch(t) for t in ids)), 60)
            sync = await asyncio.gather(*(client.infer("digits", {"input": row}) for row in x))
            return [states[-1] for states in results], sync, await client.get_task(again)
    finals, sync, idem = asyncio.run(collect())
    second.stop()
    assert [t.state for t in finals] == ["SUCCEEDED"] * 200
    for task, expected in zip(finals, sync, strict=True):
        # Float outputs depend on the batch a row was computed in (BLAS), not on the path.
        np.testing.assert_array_equal(task.result.outputs["predictions"],
                                      expected.outputs["predictions"])
        for name in ("logits", "probabilities"):
            np.testing.assert_allclose(task.result.outputs[name], expected.outputs[name],
                                       rtol=1e-5, atol=1e-5)
    with r.pipeline() as p:
        for tid in ids:
            p.hmget(f"meshserve:tasks:task:{tid}", "finishes", "runs")
        counts = p.execute()
    assert [int(f) for f, _runs in counts] == [1] * 200  # each completed exactly once
    # Runs: one per task, plus at most the one task the killed runner had in progress.
    assert 200 <= sum(int(runs) for _f, runs in counts) <= 201
    assert r.hget(f"meshserve:tasks:task:{never}", "runs") == b"0"
    assert idem.state == "SUCCEEDED"
    assert r.xlen("meshserve:tasks:queue") == 0


def test_in_memory_mode_watch_and_errors(mesh):
    x = rows(3, seed=2)

    async def main():
        async with AsyncClient(mesh.url) as client:
            tid = await client.submit("digits", {"input": x[0]})
            states = [t async for t in client.watch_task(tid)]
            assert states[-1].state == "SUCCEEDED"
            assert [s.state for s in states][:1] in (["PENDING"], ["RUNNING"], ["SUCCEEDED"])
            assert len({s.state for s in states}) == len(states)
            expected = await client.infer("digits", {"input": x[0]})
            np.testing.assert_allclose(states[-1].result.outputs["probabilities"],
                                       expected.outputs["probabilities"], rtol=1e-5, atol=1e-6)
            ids = await client.submit_batch("digits", [{"input": row} for row in x])
            finals = [[t async for t in client.watch_task(i)][-1] for i in ids]
            assert [t.state for t in finals] == ["SUCCEEDED"] * 3
            stub = apb_grpc.AsyncInferenceStub(client.channel)
            for call, code in [
                (stub.Get(apb.GetRequest(task_id="0" * 32)), grpc.StatusCode.NOT_FOUND),
                (stub.Cancel(apb.CancelRequest(task_id="nope")), grpc.StatusCode.NOT_FOUND),
                (stub.Submit(apb.SubmitRequest(request=infer_request("nope", {"input": x[0]}))),
                 grpc.StatusCode.NOT_FOUND),
                (stub.Submit(apb.SubmitRequest(request=infer_request(
                    "digits", {"input": x[0][:, :10]}))), grpc.StatusCode.INVALID_ARGUMENT),
                (stub.SubmitBatch(apb.SubmitBatchRequest(requests=[apb.SubmitRequest(
                    request=infer_request("digits", {"wrong": x[0]}))])),
                 grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == code, e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [t async for t in client.watch_task("f" * 32)]
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    asyncio.run(asyncio.wait_for(main(), 60))


def test_command_line_submit_and_result(mesh):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meshserve.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    submitted = cli("submit", "digits", "--input-file", "models/digits/example.json",
                    "--url", mesh.url)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert len(task_id) == 32
    result = cli("result", task_id, "--wait", "--url", mesh.url)
    assert result.returncode == 0, result.stderr
    assert f"task {task_id} SUCCEEDED" in result.stdout and "predictions int64 [1]" in result.stdout
    missing = cli("result", "0" * 32, "--url", mesh.url)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_runner_with_a_key_prefix_runs_what_a_gateway_with_it_queues(mesh):
    """The gateway's --async-key-prefix / --async-max-deliveries are the runner's
    --key-prefix / --max-deliveries: both use the same stream."""
    prefix = "{custom}:tasks"
    gateway = ServiceProcess("gateway", [
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
        "--model-repository", str(MODELS), "--batcher", mesh.batcher.address,
        "--redis-url", mesh.redis.url, "--async-runners", "0", "--async-key-prefix", prefix,
        "--async-max-deliveries", "2"], mesh.tmp)
    gateway.wait_ready()
    task_runner = runner(mesh, "--key-prefix", prefix, "--max-deliveries", "2")
    x = rows(1, seed=3)
    r = redis.Redis.from_url(mesh.redis.url)
    try:
        async def run():
            async with AsyncClient(gateway.address) as client:
                tid = await client.submit("digits", {"input": x[0]})
                states = await asyncio.wait_for(
                    _all(client.watch_task(tid)), 60)
                return tid, states[-1], await client.infer("digits", {"input": x[0]})
        tid, final, expected = asyncio.run(run())
    finally:
        task_runner.stop()
        gateway.stop()
    assert final.state == "SUCCEEDED"
    np.testing.assert_array_equal(final.result.outputs["predictions"],
                                  expected.outputs["predictions"])
    assert r.hget(f"{prefix}:task:{tid}", "finishes") == b"1"
    assert not r.exists(f"meshserve:tasks:task:{tid}")


async def _all(iterator) -> list:
    return [item async for item in iterator]

