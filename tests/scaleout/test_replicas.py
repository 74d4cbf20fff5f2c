"""One mesh, many replicas, as real processes: Redis, 2 model workers, 2 batchers and 2
gateways (each reaching both batchers), with API keys. Model control, statistics, async
tasks and key scopes must look the same through either gateway, and a restarted batcher
catches up with the cluster's model control."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from meshserve.batcher.client import BatcherClient
from meshserve.client import AsyncClient
from meshserve.pb.inference import grpc_service_pb2 as pb
from tests.conftest import MODELS, RedisServer, ServiceProcess, free_port
from tests.protection.conftest import write_keys

INTERNAL = ["--host", "127.0.0.1", "--metrics-port", "-1"]
ADMIN = {"name": "ops", "key": "key-admin", "models": ["*"], "scopes": ["admin"]}
APP = {"name": "app", "key": "key-app", "models": ["*"], "scopes": ["infer"]}
OTHER_APP = {"name": "app2", "key": "key-app2", "models": ["*"], "scopes": ["infer"]}
X = np.random.default_rng(0).random((1, 64), dtype=np.float32) * 16


class Replicas:
    def __init__(self, tmp):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.redis.start()
        self.workers = [ServiceProcess("model_worker", [
            *INTERNAL, "--port", "0", "--device", "cpu", "--threads", "1",
            "--model-repository", str(MODELS)], tmp) for _ in range(2)]
        for w in self.workers:
            w.wait_ready()
        # Fixed ports: a batcher restarted later comes back where the gateways expect it.
        self.batcher_ports = [free_port(), free_port()]
        self.batchers = [self.start_batcher(i) for i in range(2)]
        for b in self.batchers:
            b.wait_ready()
        keys = tmp / "keys.json"
        write_keys(keys, ADMIN, APP, OTHER_APP)
        self.gateways = [ServiceProcess("gateway", [
            *INTERNAL, "--port", "0", "--model-repository", str(MODELS),
            "--batcher", ",".join(f"127.0.0.1:{p}" for p in self.batcher_ports),
            "--redis-url", self.redis.url, "--api-keys-file", str(keys)], tmp)
            for _ in range(2)]
        for g in self.gateways:
            g.wait_ready()

    def start_batcher(self, i: int) -> ServiceProcess:
        return ServiceProcess("batcher", [
            *INTERNAL, "--port", str(self.batcher_ports[i]), "--model-repository", str(MODELS),
            "--workers", ",".join(w.address for w in self.workers), "--load", "digits",
            "--redis-url", self.redis.url], self.tmp)

    def stop(self) -> None:
        for p in [*self.gateways, *self.batchers, *self.workers]:
            p.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Replicas(tmp_path_factory.mktemp("replicas"))
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def digits_loaded(mesh):
    """Every test starts with digits loaded at its config's default (version 2)."""
    asyncio.run(admin(mesh, 0, lambda c: c.load_model("digits", ["1", "2"], "2")))


async def admin(mesh, gateway: int, call):
    async with AsyncClient(mesh.gateways[gateway].address, api_key="key-admin") as c:
        return await call(c)


async def infer(mesh, gateway: int, key: str = "key-app", **kw):
    """A fresh connection each time (a new channel to that gateway)."""
    async with AsyncClient(mesh.gateways[gateway].address, api_key=key) as c:
        return await c.infer("digits", {"input": X}, ["predictions"], use_cache=False,
                             timeout_s=30, **kw)


async def until(check, what: str, timeout_s: float = 30):
    """Polls `check` (a replica converging is asynchronous) until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = await check()
        if last:
            return last
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


def test_a_default_version_set_through_one_gateway_is_served_by_the_other(mesh):
    async def go():
        assert (await infer(mesh, 1)).model_version == "2"
        await admin(mesh, 0, lambda c: c.load_model("digits", ["1", "2"], "1"))
        assert (await infer(mesh, 0)).model_version == "1"  # at once where it was loaded

        async def other_serves_1():
            return (await infer(mesh, 1)).model_version == "1"
        await until(other_serves_1, "the other gateway serves the new default")

    asyncio.run(go())


def test_an_unload_through_one_gateway_makes_both_refuse(mesh):
    async def go():
        await admin(mesh, 1, lambda c: c.unload_model("digits"))
        # Unload answered: no batcher dispatches it any more, whichever gateway asks.
        for g in (0, 1):
            for _ in range(4):  # both batchers (the gateways alternate between them)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await infer(mesh, g, version="2")
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
                assert "not loaded" in e.value.details()
        for port in mesh.batcher_ports:
            states = await batcher_states(port)
            assert all(s.state == "UNAVAILABLE" and s.reason == "unloaded"
                       for s in states), states
        await admin(mesh, 0, lambda c: c.load_model("digits"))
        assert (await infer(mesh, 1, version="2")).model_version == "2"

    asyncio.run(go())


async def batcher_states(port: int):
    client = BatcherClient(f"127.0.0.1:{port}")
    await client.start()
    try:
        return list((await client.model_states("digits")).versions)
    finally:
        await client.close()


async def batcher_count(port: int) -> int:
    client = BatcherClient(f"127.0.0.1:{port}")
    try:
        stats = await client.statistics("digits", "2")
        return sum(m.inference_count for m in stats.models)
    finally:
        await client.close()


def test_statistics_through_either_gateway_sum_both_batchers(mesh):
    async def go():
        async with AsyncClient(mesh.gateways[0].address, api_key="key-app") as c:
            await asyncio.gather(*(
                c.infer("digits", {"input": X}, version="2", use_cache=False, timeout_s=30)
                for _ in range(40)))
        own = [await batcher_count(p) for p in mesh.batcher_ports]
        assert all(n > 0 for n in own), own  # the gateway spread its requests over both
        for g in (0, 1):
            async with AsyncClient(mesh.gateways[g].address, api_key="key-admin") as c:
                call = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits",
                                                                        version="2"))
                reply = await call
                trailing = dict(await call.trailing_metadata())
            [stats] = reply.model_stats
            assert stats.inference_count == sum(own), (g, stats.inference_count, own)
            covered = trailing["meshserve-statistics-batchers"].split(",")
            assert sorted(covered) == sorted(f"127.0.0.1:{p}" for p in mesh.batcher_ports)
            assert trailing["meshserve-statistics-cache"].startswith("this gateway only")

    asyncio.run(go())


def test_a_task_submitted_through_one_gateway_is_read_and_cancelled_through_the_other(mesh):
    async def go():
        async with AsyncClient(mesh.gateways[0].address, api_key="key-app") as a, \
                AsyncClient(mesh.gateways[1].address, api_key="key-app") as b, \
                AsyncClient(mesh.gateways[1].address, api_key="key-app2") as stranger:
            task_id = await a.submit("digits", {"input": X})
            assert (await b.get_task(task_id)).task_id == task_id
            cancelled = await b.cancel_task(task_id)
            # Cancelled, unless a runner finished it first (a done task stays as it is).
            assert cancelled.state in ("CANCELLED", "SUCCEEDED"), cancelled
            final = [t async for t in a.watch_task(task_id)][-1]
            assert final.state == cancelled.state
            for call in (stranger.get_task, stranger.cancel_task):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(task_id)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(go())


def test_an_infer_key_cannot_unload(mesh):
    async def go():
        async with AsyncClient(mesh.gateways[0].address, api_key="key-app") as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.unload_model("digits")
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "lacks the 'admin' scope" in e.value.details()
        assert (await infer(mesh, 1, version="2")).model_version == "2"

    asyncio.run(go())


def test_a_restarted_batcher_catches_up_with_the_model_control(mesh):
    async def go():
        mesh.batchers[1].stop()
        # Changed while it is down: unloaded through a gateway (the other batcher answers).
        await admin(mesh, 0, lambda c: c.unload_model("digits"))
        mesh.batchers[1] = mesh.start_batcher(1)  # with --load digits, as at first
        mesh.batchers[1].wait_ready()
        states = await batcher_states(mesh.batcher_ports[1])
        assert states and all(s.reason == "unloaded" for s in states), states
        # Loaded again with a default while it runs: it follows.
        mesh.batchers[0].stop()
        await admin(mesh, 1, lambda c: c.load_model("digits", ["2"], "2"))
        mesh.batchers[0] = mesh.start_batcher(0)
        mesh.batchers[0].wait_ready()

        async def ready_on_both():
            states = [await batcher_states(p) for p in mesh.batcher_ports]
            return all(any(s.version == "2" and s.state == "READY" for s in ss)
                       for ss in states)
        await until(ready_on_both, "version 2 READY for both batchers")
        for g in (0, 1):
            assert (await infer(mesh, g)).model_version == "2"

    asyncio.run(go())


def test_up_takes_batchers():
    from meshserve import local_mesh

    assert local_mesh.parse(["--batchers", "2", "--gateways", "2"]).batchers == 2
    assert local_mesh.parse([]).batchers == 1
    with pytest.raises(SystemExit):
        local_mesh.parse(["--batchers", "0"])


def test_without_redis_the_batchers_hold_the_model_control(tmp_path):
    """No Redis: each gateway writes the model control to every batcher and watches one."""
    worker = ServiceProcess("model_worker", [
        *INTERNAL, "--port", "0", "--device", "cpu", "--threads", "1",
        "--model-repository", str(MODELS)], tmp_path, env={"REDIS_URL": ""})
    started = [worker]
    try:
        worker.wait_ready()
        batchers = [ServiceProcess("batcher", [
            *INTERNAL, "--port", "0", "--model-repository", str(MODELS),
            "--workers", worker.address, "--load", "digits"], tmp_path, env={"REDIS_URL": ""})
            for _ in range(2)]
        started += batchers
        for b in batchers:
            b.wait_ready()
        target = ",".join(b.address for b in batchers)
        gateways = [ServiceProcess("gateway", [
            *INTERNAL, "--port", "0", "--model-repository", str(MODELS), "--batcher", target],
            tmp_path, env={"REDIS_URL": ""}) for _ in range(2)]
        started += gateways
        for g in gateways:
            g.wait_ready()

        async def version_at(g: ServiceProcess) -> str:
            async with AsyncClient(g.address) as c:
                r = await c.infer("digits", {"input": X}, use_cache=False, timeout_s=30)
                return r.model_version

        async def go():
            async with AsyncClient(gateways[0].address) as c:
                await c.load_model("digits", ["1", "2"], "1")

            async def other_serves_1():
                return await version_at(gateways[1]) == "1"
            await until(other_serves_1, "the other gateway serves the new default")
            async with AsyncClient(gateways[1].address) as c:
                await c.unload_model("digits")
            for b in batchers:
                states = await batcher_states(int(b.address.rsplit(":", 1)[1]))
                assert all(s.reason == "unloaded" for s in states), states
            for g in gateways:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await version_at(g)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(go())
    finally:
        for p in reversed(started):
            p.stop()
