"""Routing domain: weighted and sticky choice, shadow sampling, validation, load EWMA and
the alias state machine (with a controlled clock). No gRPC."""

from __future__ import annotations

import json
import math
import random

import pytest

from meshserve.common.errors import ConfigError, InvalidInput
from meshserve.common.repository import parse_config
from meshserve.gateway.routing import (
    AliasSpec,
    AliasState,
    LoadTracker,
    ModelFacts,
    Policy,
    ShadowGate,
    Target,
    choose,
    promote,
    sample_shadows,
    unit,
    validate,
)
from tests.conftest import MODELS

DIGITS = ModelFacts(("1", "2"), (("input", "FP32", (64,)),))
SMALL = ModelFacts(("1",), (("input", "FP32", (64,)),))
WIDE = ModelFacts(("1",), (("input", "FP32", (32,)),))
MODELS_FACTS = {"digits": DIGITS, "digits_small": SMALL, "wide": WIDE}


def facts(name):
    return MODELS_FACTS.get(name)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_unit_is_stable_and_in_range():
    values = [unit(f"user-{i}") for i in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [unit(f"user-{i}") for i in range(1000)]
    assert unit("a", "salt1") != unit("a", "salt2")


def test_choose_follows_weights_within_binomial_tolerance():
    split = (("1", 90.0), ("2", 10.0))
    n = 20_000
    twos = sum(choose(split, unit(f"req-{i}")) == "2" for i in range(n))
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(twos - n * 0.1) < 4 * sigma


def test_choose_boundaries_and_zero_weights():
    split = (("1", 0.0), ("2", 100.0), ("3", 0.0))
    assert {choose(split, u) for u in (0.0, 0.3, 0.999999)} == {"2"}
    assert choose((("1", 50.0), ("2", 50.0)), 0.4999) == "1"
    assert choose((("1", 50.0), ("2", 50.0)), 0.5) == "2"


def test_a_key_sticks_and_growing_the_canary_keeps_its_users():
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: choose((("1", 90.0), ("2", 10.0)), unit(k)) for k in keys}
    assert before == {k: choose((("1", 90.0), ("2", 10.0)), unit(k)) for k in keys}
    after = {k: choose((("1", 80.0), ("2", 20.0)), unit(k)) for k in keys}
    assert all(after[k] == "2" for k in keys if before[k] == "2")
    assert sum(v == "2" for v in after.values()) > sum(v == "2" for v in before.values())


def test_shadow_sampling_percentages():
    rng = random.Random(7)
    policy = Policy("digits", split=(("2", 100.0),), shadow=(("1", 20.0), ("3", 100.0)))
    n = 5000
    picks = [sample_shadows(policy, rng.random) for _ in range(n)]
    ones = sum("1" in p for p in picks)
    assert all("3" in p for p in picks)
    assert abs(ones - n * 0.2) < 4 * math.sqrt(n * 0.2 * 0.8)


def test_shadow_gate_bounds_in_flight():
    gate = ShadowGate()
    assert gate.enter(2) and gate.enter(2)
    assert not gate.enter(2)
    gate.leave()
    assert gate.enter(2)


def test_validate_normalises_weights_and_defaults():
    p = validate(Policy("digits", split=(("1", 3.0), ("2", 1.0)), max_shadow_in_flight=0),
                 facts, {})
    assert p.split == (("1", 75.0), ("2", 25.0))
    assert p.max_shadow_in_flight == 64
    assert p.primary_version == "1" and p.route_of("2") == "canary"


@pytest.mark.parametrize("policy, message", [
    (Policy("digits", split=(("1", 90.0), ("7", 10.0))), "has no version '7'"),
    (Policy("digits", split=(("1", 0.0),)), "sum to 0"),
    (Policy("digits", split=(("1", -1.0), ("2", 2.0))), "must be >= 0"),
    (Policy("digits", split=(("1", 50.0), ("1", 50.0))), "listed twice"),
    (Policy("digits", shadow=(("1", 120.0),)), "percentage must be in"),
    (Policy("digits"), "is empty"),
    (Policy("nope", split=(("1", 100.0),)), "not a model in the repository"),
    (Policy("digits", fallback=(Target("wide"),)), "differ from"),
    (Policy("digits", fallback=(Target("ghost"),)), "'ghost' is not a model"),
    (Policy("digits", fallback=(Target("digits_small", "9"),)), "no version '9'"),
    (Policy("digits", fallback=(Target("digits"),)), "needs a version"),
    (Policy("../x", split=(("1", 1.0),)), "invalid model name"),
])
def test_validate_rejects(policy, message):
    with pytest.raises(InvalidInput, match=message):
        validate(policy, facts, {})


def _alias(name, preferred, cheaper, **kw):
    spec = AliasSpec(Target.parse(preferred), Target.parse(cheaper), **kw)
    return Policy(name, alias=spec)


def test_validate_alias_rules():
    ok = validate(_alias("auto", "digits:2", "digits_small", high_queue_us=1000), facts, {})
    assert ok.alias.low_queue_us == 500  # defaulted to half the high mark
    with pytest.raises(InvalidInput, match="is a model in the repository"):
        validate(_alias("digits", "digits:2", "digits_small", high_queue_us=1), facts, {})
    with pytest.raises(InvalidInput, match="set high_queue_us or high_latency_us"):
        validate(_alias("auto", "digits:2", "digits_small"), facts, {})
    with pytest.raises(InvalidInput, match="must be below"):
        validate(_alias("auto", "digits", "digits_small", high_queue_us=10, low_queue_us=10),
                 facts, {})
    with pytest.raises(InvalidInput, match="neither a repository model nor an alias"):
        validate(_alias("auto", "ghost", "digits_small", high_queue_us=10), facts, {})
    with pytest.raises(InvalidInput, match="alias cycle: a -> a"):
        validate(_alias("a", "a", "digits_small", high_queue_us=10), facts, {})
    a = validate(_alias("a", "digits", "digits_small", high_queue_us=10), facts, {})
    b = validate(_alias("b", "a", "digits_small", high_queue_us=10), facts, {"a": a})
    with pytest.raises(InvalidInput, match="alias cycle: a -> b -> a"):
        validate(_alias("a", "b", "digits_small", high_queue_us=10), facts, {"a": a, "b": b})


def test_promote_makes_a_version_primary_at_100():
    p = Policy("digits", split=(("2", 95.0), ("1", 5.0)), shadow=(("1", 10.0),))
    promoted = validate(promote(p, "digits", "1"), facts, {})
    assert promoted.split == (("1", 100.0), ("2", 0.0))
    assert promoted.shadow == ()
    assert {choose(promoted.split, unit(str(i))) for i in range(500)} == {"1"}


def test_load_tracker_ewma_and_decay():
    clock = Clock()
    loads = LoadTracker(alpha=0.5, half_life_s=1.0, clock=clock)
    assert loads.load_us("digits", "2") == (0.0, 0.0)
    loads.observe("digits", "2", 1_000_000, 1_000_000)  # 1 ms queue, 1 ms compute
    loads.observe("digits", "2", 3_000_000, 1_000_000)
    queue_us, latency_us = loads.load_us("digits", "2")
    assert queue_us == pytest.approx(2000) and latency_us == pytest.approx(3000)
    clock.now += 2.0  # two half-lives without samples
    assert loads.load_us("digits", "2")[0] == pytest.approx(500)
    assert loads.load_us("digits")[0] == pytest.approx(500)  # the most loaded version


def test_alias_hysteresis_and_dwell():
    clock = Clock()
    spec = AliasSpec(Target("big"), Target("small"), high_queue_us=1000, low_queue_us=200,
                     min_dwell_s=5.0)
    state = AliasState(spec, clock)
    assert state.target(500, 0) == Target("big")  # between the marks: stays
    assert state.target(1500, 0) == Target("small")  # above high: switches
    clock.now += 1.0
    assert state.target(0, 0) == Target("small")  # low, but within the dwell time
    clock.now += 5.0
    assert state.target(500, 0) == Target("small")  # between the marks: stays
    assert state.target(100, 0) == Target("big")  # below low after the dwell: back
    clock.now += 1.0
    assert state.target(5000, 0) == Target("big")  # dwell again
    assert state.switches == 2


def test_alias_on_latency():
    clock = Clock()
    spec = AliasSpec(Target("big"), Target("small"), high_latency_us=10_000,
                     low_latency_us=2_000)
    state = AliasState(spec, clock)
    assert state.target(0, 20_000) == Target("small")
    assert state.target(0, 5_000) == Target("small")
    assert state.target(0, 1_000) == Target("big")


def _config(routing):
    data = json.loads((MODELS / "digits" / "config.json").read_text())
    data["routing"] = routing
    return parse_config(data, "models/digits/config.json", expected_name="digits")


def test_config_routing_section():
    r = _config({"split": {"1": 90, "2": 10}, "shadow": {"2": 5},
                 "fallback": ["digits:1", "digits_small"], "fallback_queue_us": 5000}).routing
    assert r.split == (("1", 90.0), ("2", 10.0)) and r.shadow == (("2", 5.0),)
    assert r.fallback == ("digits:1", "digits_small") and r.fallback_queue_us == 5000
    assert _config({}).routing is not None


@pytest.mark.parametrize("routing, message", [
    ({"splitt": {}}, "routing.splitt: unknown field"),
    ({"split": {"x": 1}}, "routing.split: 'x' is not a version"),
    ({"split": {"1": -1}}, "routing.split: version 1: weight must be"),
    ({"split": {"1": 0}}, "routing.split: the weights sum to 0"),
    ({"shadow": {"1": 150}}, "routing.shadow: version 1: percentage"),
    ({"fallback": [3]}, "routing.fallback: entries are"),
    ({"fallback_queue_us": -5}, "routing.fallback_queue_us: must be >= 0"),
])
def test_config_routing_errors_name_file_and_field(routing, message):
    with pytest.raises(ConfigError, match=f"models/digits/config.json: {message}"):
        _config(routing)
