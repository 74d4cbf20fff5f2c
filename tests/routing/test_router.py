"""The router inside a real Gateway core, with a scripted batcher standing in for the
batcher service (a unit test of the routing hook): fallback on errors and on the queue
threshold, shadows never answering, config.json policies, runtime override, promote."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from meshserve.common.errors import InvalidInput, NotFound, Unavailable
from meshserve.common.repository import ModelRepository
from meshserve.common.tensors import to_pb
from meshserve.common.validation import WireTensor
from meshserve.gateway.core import Gateway, InferCall
from meshserve.gateway.routing import Policy, Target
from meshserve.gateway.traffic import Router
from meshserve.pb.meshserve.v1 import batcher_pb2
from tests.conftest import MODELS


def sync(test):
    """Runs an async test in its own event loop."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


class ScriptedBatcher:
    """Answers predictions = [version number] per row, with a queue time per (model,
    version); raises the error set for a (model, version)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.errors: dict[tuple[str, str], Exception] = {}
        self.queue_ns: dict[tuple[str, str], int] = {}
        self.gate: asyncio.Event | None = None

    async def infer(self, model, version, inputs, outputs, priority=0, timeout_s=None):
        self.calls.append((model, version))
        if (model, version) in self.errors:
            raise self.errors[(model, version)]
        rows = inputs[0].shape[0]
        pred = to_pb("predictions", np.full(rows, int(version), np.int64))
        logits = to_pb("logits", np.zeros((rows, 10), np.float32))
        probs = to_pb("probabilities", np.zeros((rows, 10), np.float32))
        return batcher_pb2.InferResult(outputs=[pred, logits, probs], code=0,
                                       queue_ns=self.queue_ns.get((model, version), 1000),
                                       compute_ns=1000)


@pytest.fixture
def repo(tmp_path):
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    small = tmp_path / "digits_small"
    small.mkdir()
    shutil.copytree(MODELS / "digits" / "1", small / "1")
    config = json.loads((MODELS / "digits" / "config.json").read_text())
    config.update(name="digits_small", default_version="1")
    (small / "config.json").write_text(json.dumps(config))
    return tmp_path


def make(repo):
    batcher = ScriptedBatcher()
    gateway = Gateway(ModelRepository(repo), batcher,
                      routing=functools.partial(Router, registry=CollectorRegistry()))
    return gateway, gateway.router, batcher


def call(model="digits", version="", key=""):
    x = np.zeros((1, 64), np.float32)
    return InferCall(model, version, [WireTensor("input", "FP32", [1, 64], x.tobytes())],
                     [], use_cache=False, route_key=key)


@sync
async def test_no_policy_goes_to_the_default_version(repo):
    gateway, router, batcher = make(repo)
    await router.start()
    outcome = await gateway.infer(call())
    assert (outcome.model, outcome.version) == ("digits", "2")
    assert router.policies == {}


@sync
async def test_fallback_on_unavailable_and_explicit_version_bypass(repo):
    gateway, router, batcher = make(repo)
    await router.start()
    await router.set(Policy("digits", split=(("2", 100.0),),
                            fallback=(Target("digits", "1"), Target("digits_small"))))
    batcher.errors[("digits", "2")] = Unavailable("worker gone")
    outcome = await gateway.infer(call())
    assert (outcome.model, outcome.version) == ("digits", "1")
    batcher.errors[("digits", "1")] = Unavailable("worker gone")
    outcome = await gateway.infer(call())
    assert (outcome.model, outcome.version) == ("digits_small", "1")
    batcher.errors[("digits_small", "1")] = Unavailable("all gone")
    with pytest.raises(Unavailable, match="all gone"):
        await gateway.infer(call())
    with pytest.raises(Unavailable, match="worker gone"):  # explicit version: no routing
        await gateway.infer(call(version="2"))
    counts = {(v, r): (c.requests, c.errors) for _m, v, r, c in router.stats("digits")}
    assert counts[("2", "primary")] == (3, 3)
    assert counts[("digits:1", "fallback")] == (3, 2)
    assert counts[("digits_small:1", "fallback")] == (1, 0)
    assert counts[("digits_small", "fallback")] == (1, 1)


@sync
async def test_invalid_input_does_not_fall_back(repo):
    gateway, router, batcher = make(repo)
    await router.start()
    await router.set(Policy("digits", fallback=(Target("digits_small"),)))
    bad = InferCall("digits", "", [WireTensor("input", "FP32", [1, 3], b"\0" * 12)], [])
    with pytest.raises(InvalidInput):
        await gateway.infer(bad)
    assert batcher.calls == []


@sync
async def test_fallback_when_the_queue_is_past_the_threshold(repo):
    gateway, router, batcher = make(repo)
    await router.start()
    await router.set(Policy("digits", split=(("2", 100.0),), fallback=(Target("digits_small"),),
                            fallback_queue_us=5_000))
    batcher.queue_ns[("digits", "2")] = 50_000_000  # 50 ms in the queue
    first = await gateway.infer(call())
    assert first.model == "digits"  # no load known yet
    for _ in range(5):
        await gateway.infer(call())  # the EWMA of digits:2 passes 5 ms on the first
    assert gateway.loads.load_us("digits", "2")[0] > 5_000
    outcome = await gateway.infer(call())
    assert outcome.model == "digits_small"


@sync
async def test_shadow_is_mirrored_and_never_answers(repo):
    gateway, router, batcher = make(repo)
    router.draw = lambda: 0.0  # always sampled
    await router.start()
    await router.set(Policy("digits", split=(("2", 100.0),), shadow=(("1", 10.0),)))
    outcomes = [await gateway.infer(call(key=str(i))) for i in range(5)]
    await asyncio.gather(*router._shadows)
    assert {o.version for o in outcomes} == {"2"}
    assert batcher.calls.count(("digits", "1")) == 5
    [(_m, _v, _r, shadow)] = [s for s in router.stats("digits") if s[2] == "shadow"]
    assert (shadow.requests, shadow.agree, shadow.disagree) == (5, 0, 5)  # 1 != 2
    sample = router.registry.get_sample_value
    assert sample("meshserve_gateway_shadow_agreement_total",
                  {"model": "digits", "version": "1", "result": "disagree"}) == 5
    assert sample("meshserve_gateway_route_requests_total",
                  {"model": "digits", "version": "1", "route": "shadow", "code": "OK"}) == 5
    assert sample("meshserve_gateway_route_seconds_count",
                  {"model": "digits", "version": "2", "route": "primary"}) == 5


@sync
async def test_shadows_in_flight_are_bounded(repo):
    gateway, router, batcher = make(repo)
    router.draw = lambda: 0.0
    await router.start()
    await router.set(Policy("digits", split=(("2", 100.0),), shadow=(("1", 100.0),),
                            max_shadow_in_flight=2))
    release = asyncio.Event()
    original = batcher.infer

    async def slow(model, version, *a, **kw):
        if version == "1":
            await release.wait()
        return await original(model, version, *a, **kw)

    batcher.infer = slow
    for i in range(5):
        assert (await gateway.infer(call(key=str(i)))).version == "2"
    assert len(router._shadows) == 2  # three were dropped, none delayed an answer
    release.set()
    await asyncio.gather(*router._shadows)


@sync
async def test_config_policy_runtime_override_and_promote(repo):
    config = json.loads((repo / "digits" / "config.json").read_text())
    config["routing"] = {"split": {"1": 100}, "fallback": ["digits_small"]}
    (repo / "digits" / "config.json").write_text(json.dumps(config))
    gateway, router, batcher = make(repo)
    await router.start()
    assert router.policy("digits").source == "config"
    assert (await gateway.infer(call())).version == "1"
    await router.set(Policy("digits", split=(("2", 100.0),)))
    assert (await gateway.infer(call())).version == "2"
    promoted = await router.promote("digits", "1")
    assert promoted.split == (("1", 100.0), ("2", 0.0)) and promoted.revision == 2
    assert (await gateway.infer(call())).version == "1"
    await router.clear("digits")
    assert router.policy("digits").source == "config"


@sync
async def test_alias_metadata_name_and_unknown_alias(repo):
    gateway, router, batcher = make(repo)
    await router.start()
    from meshserve.gateway.routing import AliasSpec

    await router.set(Policy("auto", alias=AliasSpec(Target("digits", "2"), Target("digits_small"),
                                                    high_queue_us=1000)))
    assert gateway.target_name("auto") == "digits"
    outcome = await gateway.infer(call("auto"))
    assert (outcome.model, outcome.version) == ("digits", "2")
    with pytest.raises(NotFound):
        await gateway.infer(call("other_alias"))
