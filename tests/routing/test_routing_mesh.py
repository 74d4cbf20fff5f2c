"""Routing through real processes: splits, stickiness, shadows, policy propagation between
gateways (Redis and the batcher's store), the cost-aware alias, and fallback when the
primary's only worker dies. Uses our own stubs (meshserve.client), not tritonclient."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from meshserve.client import AsyncClient
from meshserve.pb.meshserve.v1 import routing_pb2 as rpb
from tests.conftest import MODELS, ServiceProcess

N_SPLIT = 2000
EXAMPLE = np.array(json.loads((MODELS / "digits" / "example.json").read_text())["input"],
                   dtype=np.float32)


def rows(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32) * 16


async def ready(client: AsyncClient, model: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await client.model_ready(model, version):
        assert time.monotonic() < deadline, f"{model}:{version} never became ready"
        await asyncio.sleep(0.1)


async def many(client: AsyncClient, n: int, x: np.ndarray | None = None,
               concurrency: int = 64, **kw) -> list:
    """n requests, each with its own request id; their served_by values in order."""
    slots = asyncio.Semaphore(concurrency)
    x = rows() if x is None else x

    async def one(i):
        async with slots:
            r = await client.infer("digits", {"input": x}, ["predictions"],
                                   request_id=f"req-{i}", use_cache=False, timeout_s=30, **kw)
            return r.served_by
    return await asyncio.gather(*(one(i) for i in range(n)))


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module", autouse=True)
def models_ready(mesh):
    async def go():
        async with AsyncClient(mesh.url) as c:
            for model, version in (("digits", "1"), ("digits", "2"), ("digits_small", "1")):
                await ready(c, model, version)
    run(go())


@pytest.fixture(autouse=True)
def clear_policies(mesh):
    yield

    async def go():
        async with AsyncClient(mesh.url) as c:
            for model in ("digits", "digits_auto"):
                await c.route_clear(model)
        async with AsyncClient(mesh.gateways_batcher[0].address) as c:
            await c.route_clear("digits")
    run(go())


def test_split_90_10_within_binomial_tolerance(mesh):
    async def go():
        async with AsyncClient(mesh.url) as c:
            status = await c.route_set("digits", {"1": 90, "2": 10})
            assert [(w.version, w.weight) for w in status.policy.split] == [("1", 90), ("2", 10)]
            served = Counter(await many(c, N_SPLIT))
            status = await c.route_get("digits")
        return served, status

    served, status = run(go())
    assert set(served) == {"digits:1", "digits:2"}
    sigma = math.sqrt(N_SPLIT * 0.1 * 0.9)
    assert abs(served["digits:2"] - N_SPLIT * 0.1) < 4 * sigma, served
    counts = {(s.version, s.route): s.requests for s in status.stats}
    assert counts[("1", "primary")] == served["digits:1"]
    assert counts[("2", "canary")] == served["digits:2"]


def test_route_key_sticks_and_explicit_version_bypasses(mesh):
    async def go():
        async with AsyncClient(mesh.url) as c:
            await c.route_set("digits", {"1": 50, "2": 50})
            seen = {}
            for k in range(16):
                for i in range(4):
                    r = await c.infer("digits", {"input": rows()}, request_id=f"r{k}-{i}",
                                      route_key=f"user-{k}", use_cache=False)
                    seen.setdefault(k, set()).add(r.served_by)
            direct = await c.infer("digits", {"input": rows()}, version="1", route_key="user-0")
            return seen, direct

    seen, direct = run(go())
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {"digits:1", "digits:2"}
    assert direct.served_by == "digits:1" and direct.model_version == "1"


def test_shadow_gets_its_share_and_never_answers(mesh):
    n, percent = 400, 25

    async def go():
        async with AsyncClient(mesh.url) as c:
            before = await c.statistics("digits", "1")
            await c.route_set("digits", {"2": 100}, shadow={"1": percent})
            served = Counter(await many(c, n, EXAMPLE))
            # Shadows finish after the answers: wait until this gateway's count settles.
            last, deadline = -1, time.monotonic() + 30
            while True:
                status = await c.route_get("digits")
                shadow = next((s for s in status.stats if s.route == "shadow"), None)
                done = shadow.requests if shadow else 0
                if done == last or time.monotonic() > deadline:
                    break
                last = done
                await asyncio.sleep(0.5)
            after = await c.statistics("digits", "1")
            return served, shadow, before, after

    served, shadow, before, after = run(go())
    assert served == {"digits:2": n}  # the shadow never answers
    sigma = math.sqrt(n * percent / 100 * (1 - percent / 100))
    assert abs(shadow.requests - n * percent / 100) < 4 * sigma, shadow
    assert shadow.errors == 0
    assert shadow.agree + shadow.disagree == shadow.requests
    assert shadow.agree == shadow.requests  # both versions see an 8 in the example
    # Every shadow request reached version 1 (only shadows go there in this test).
    executed = after.model_stats[0].inference_count - before.model_stats[0].inference_count
    assert executed == shadow.requests


def test_invalid_policies_are_invalid_argument(mesh):
    async def go():
        async with AsyncClient(mesh.url) as c:
            errors = []
            for kwargs in ({"split": {"1": 90, "7": 10}}, {"fallback": ["wide"]},
                           {"split": {"1": 0}}):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.route_set("digits", **kwargs)
                errors.append((e.value.code(), e.value.details()))
            return errors

    errors = run(go())
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in errors)
    assert "has no version '7'" in errors[0][1]
    assert "differ from" in errors[1][1] and "wide" in errors[1][1]
    assert "sum to 0" in errors[2][1]


@pytest.mark.parametrize("store", ["redis", "batcher"])
def test_a_policy_set_on_one_gateway_reaches_another(mesh, store):
    first, second = mesh.gateways_redis if store == "redis" else mesh.gateways_batcher

    async def go():
        async with AsyncClient(first.address) as a, AsyncClient(second.address) as b:
            changes = b.route_watch("digits")
            initial = await anext(changes)  # the watch is open: b's current policy
            assert initial.deleted
            started = time.monotonic()
            await a.route_set("digits", {"2": 100}, fallback=["digits_small"])
            change = await asyncio.wait_for(anext(changes), 10)
            seen_after_s = time.monotonic() - started
            await changes.aclose()
            r = await b.infer("digits", {"input": rows()}, route_key="k", use_cache=False)
            status = await b.route_get("digits")
            return change, seen_after_s, r, status

    change, seen_after_s, r, status = run(go())
    print(f"{store}: policy seen by the second gateway after {seen_after_s * 1000:.0f} ms")
    assert not change.deleted and [w.version for w in change.policy.split] == ["2"]
    assert r.served_by == "digits:2"
    assert [(t.model, t.version) for t in status.policy.fallback] == [("digits_small", "")]


def test_alias_switches_under_load_and_back(mesh):
    async def go():
        async with AsyncClient(mesh.url) as c:
            alias = rpb.AliasPolicy(
                preferred=rpb.RouteTarget(model="digits", version="2"),
                cheaper=rpb.RouteTarget(model="digits_small"),
                high_queue_us=20_000, low_queue_us=5_000, min_dwell_s=0.5)
            status = await c.route_set("digits_auto", alias=alias)
            assert status.alias_target == "digits:2"
            meta = await c.metadata("digits_auto")
            assert meta.name == "digits"
            assert await c.model_ready("digits_auto")
            idle = await c.infer("digits_auto", {"input": rows()}, use_cache=False)
            assert idle.served_by == "digits:2"

            stop = asyncio.Event()
            big = rows(64)

            async def load():  # direct traffic to digits:2, deep enough to queue
                while not stop.is_set():
                    await c.infer("digits", {"input": big}, version="2", use_cache=False,
                                  timeout_s=60)

            loaders = [asyncio.create_task(load()) for _ in range(48)]
            switched = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await c.infer("digits_auto", {"input": rows()}, use_cache=False)
                if r.served_by == "digits_small:1":
                    switched = r
                    meta_loaded = await c.metadata("digits_auto")
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*loaders)
            assert switched is not None, "the alias never switched to the cheaper model"
            assert meta_loaded.name == "digits_small"
            back = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await c.infer("digits_auto", {"input": rows()}, use_cache=False)
                if r.served_by == "digits:2":
                    back = r
                    break
                await asyncio.sleep(0.2)
            assert back is not None, "the alias never returned to the preferred model"
            status = await c.route_get("digits_auto")
            return status

    status = run(go())
    routed = {s.version: s.requests for s in status.stats if s.route == "alias"}
    assert routed["digits:2"] >= 2 and routed["digits_small"] >= 1


@pytest.mark.parametrize("store", ["redis", "batcher"])
def test_a_gateway_started_later_reads_the_stored_policy(mesh, store, tmp_path):
    first = (mesh.gateways_redis if store == "redis" else mesh.gateways_batcher)[0]
    args = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
            "--model-repository", str(mesh.repo), "--batcher", mesh.batcher.address,
            "--async-runners", "0"]
    if store == "redis":
        args += ["--redis-url", mesh.redis.url]
    run(_set(first.address, {"1": 30, "2": 70}))
    late = ServiceProcess("gateway", args, tmp_path, env={"REDIS_URL": ""})
    try:
        late.wait_ready()
        status = run(_get(late.address))
    finally:
        late.stop()
    assert [(w.version, w.weight) for w in status.policy.split] == [("1", 30), ("2", 70)]
    assert status.policy.source == "runtime"


async def _set(url, split):
    async with AsyncClient(url) as c:
        await c.route_set("digits", split)


async def _get(url):
    async with AsyncClient(url) as c:
        return await c.route_get("digits")


def test_fallback_when_the_primary_worker_dies(mesh):
    """Last: it kills worker A (digits' only worker)."""
    async def go():
        async with AsyncClient(mesh.url) as c:
            await c.route_set("digits", {"2": 100}, fallback=["digits_small"])
            stop = asyncio.Event()
            served: list[str] = []
            failures: list[BaseException] = []

            async def client_loop(k):
                i = 0
                while not stop.is_set():
                    try:
                        r = await c.infer("digits", {"input": rows(1, k)}, use_cache=False,
                                          request_id=f"{k}-{i}", timeout_s=30)
                        served.append(r.served_by)
                    except Exception as e:  # noqa: BLE001 - counted, asserted below
                        failures.append(e)
                    i += 1

            loops = [asyncio.create_task(client_loop(k)) for k in range(8)]
            while len(served) < 100:
                await asyncio.sleep(0.05)
            before_kill = len(served)
            await asyncio.to_thread(mesh.worker_a.kill)
            deadline = time.monotonic() + 30
            while served.count("digits_small:1") < 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*loops)
            status = await c.route_get("digits")
            return served, before_kill, failures, status

    served, before_kill, failures, status = run(go())
    assert not failures, failures[:3]
    assert set(served[:before_kill]) == {"digits:2"}
    assert served.count("digits_small:1") >= 100
    assert served[-1] == "digits_small:1"
    fallback = [s for s in status.stats if s.route == "fallback"]
    assert sum(s.requests for s in fallback) >= 100
