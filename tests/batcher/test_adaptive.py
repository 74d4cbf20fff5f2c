"""Adaptive batching from a synthetic latency profile."""

import pytest

from meshserve.batcher.adaptive import AdaptivePolicy, ArrivalRate, LatencyProfile


def profile_of(latency_s: dict[int, float]) -> LatencyProfile:
    p = LatencyProfile(alpha=1.0)
    for size, s in latency_s.items():
        p.observe(size, s)
    return p


# A fixed cost plus a per-row cost: 2 ms + 0.25 ms per row.
SYNTHETIC = {b: 0.002 + 0.00025 * b for b in (1, 2, 4, 8, 16, 32, 64)}


def test_profile_is_an_ewma_and_interpolates():
    p = LatencyProfile(alpha=0.5)
    p.observe(4, 0.010)
    p.observe(4, 0.020)
    assert p.estimate_s(4) == pytest.approx(0.015)
    p.observe(8, 0.025)
    assert p.estimate_s(6) == pytest.approx(0.020)  # halfway between 4 and 8
    assert p.estimate_s(16) == pytest.approx(0.050)  # extrapolated per row
    assert p.estimate_s(2) == pytest.approx(0.015)
    assert LatencyProfile().estimate_s(3) is None


def test_largest_batch_within_the_latency_target_is_chosen():
    policy = AdaptivePolicy(64, target_latency_us=20_000, explore_every=0)
    # 10 000 rows/s: filling b rows takes (b - 1) / 10 000 s.
    choice = policy.choose(profile_of(SYNTHETIC), rows_per_s=10_000)
    # b=32: 3.1 ms fill + 10 ms compute fits; b=64: 6.3 ms + 18 ms does not.
    assert choice.batch_size == 32
    assert choice.wait_s == pytest.approx(31 / 10_000)
    assert choice.throughput_rows_per_s == pytest.approx(32 / SYNTHETIC[32])


def test_a_tight_target_picks_smaller_batches():
    policy = AdaptivePolicy(64, target_latency_us=5_000, explore_every=0)
    choice = policy.choose(profile_of(SYNTHETIC), rows_per_s=10_000)
    # b=8: 0.7 ms + 4 ms fits; b=16: 1.5 ms + 6 ms does not.
    assert choice.batch_size == 8


def test_a_slow_arrival_rate_limits_the_batch_to_what_can_fill_in_time():
    policy = AdaptivePolicy(64, target_latency_us=20_000, explore_every=0)
    choice = policy.choose(profile_of(SYNTHETIC), rows_per_s=500)
    # At 500 rows/s, 8 rows take 14 ms to arrive: 14 + 4 <= 20; 16 rows take 30 ms.
    assert choice.batch_size == 8


def test_flat_profile_prefers_the_biggest_feasible_batch():
    policy = AdaptivePolicy(64, target_latency_us=50_000, explore_every=0)
    flat = profile_of({1: 0.001, 64: 0.001})
    assert policy.choose(flat, rows_per_s=100_000).batch_size == 64


def test_unmeasured_sizes_are_explored_occasionally():
    policy = AdaptivePolicy(64, target_latency_us=50_000, explore_every=4)
    partial = profile_of({1: 0.002, 2: 0.0025})
    choices = [policy.choose(partial, rows_per_s=100_000) for _ in range(8)]
    explored = [c for c in choices if c.explored]
    assert len(explored) == 2
    assert all(c.batch_size == 4 for c in explored)  # the next size above the measured ones


def test_no_measurement_yet_runs_at_once():
    policy = AdaptivePolicy(16, target_latency_us=10_000)
    choice = policy.choose(LatencyProfile(), rows_per_s=0)
    assert choice.wait_s == 0 and choice.explored


def test_arrival_rate_estimate():
    t = [0.0]
    rate = ArrivalRate(now=lambda: t[0], alpha=1.0)
    for _ in range(5):
        rate.observe(1)
        t[0] += 0.001
    assert rate.rows_per_s == pytest.approx(1000)
