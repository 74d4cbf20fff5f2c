"""Adaptive batching: a measured compute-latency profile per batch size, and the batch
size and wait that maximise throughput within the model's latency target.

Pure domain. The profile is an EWMA of compute time per executed batch size (one profile
per worker); sizes between measured ones are interpolated linearly; beyond the largest
measured size latency is extrapolated from the last measured rows-per-second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.batcher.queue import Plan


class LatencyProfile:
    """EWMA of compute latency (seconds) per batch size."""

    def __init__(self, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._latency_s: dict[int, float] = {}

    def observe(self, batch_size: int, compute_s: float) -> None:
        if batch_size < 1 or compute_s < 0:
            return
        old = self._latency_s.get(batch_size)
        self._latency_s[batch_size] = (
            compute_s if old is None else old + self.alpha * (compute_s - old)
        )

    def measured(self) -> dict[int, float]:
        return dict(self._latency_s)

    def estimate_s(self, batch_size: int) -> float | None:
        """Interpolated latency of a batch size; None before any measurement."""
        if not self._latency_s:
            return None
        if batch_size in self._latency_s:
            return self._latency_s[batch_size]
        sizes = sorted(self._latency_s)
        if batch_size < sizes[0]:
            # Below the smallest measured size, latency is no larger than there.
            return self._latency_s[sizes[0]]
        if batch_size > sizes[-1]:
            top = sizes[-1]
            return self._latency_s[top] * batch_size / top
        for lo, hi in zip(sizes, sizes[1:], strict=False):
            if lo < batch_size < hi:
                a, b = self._latency_s[lo], self._latency_s[hi]
                return a + (b - a) * (batch_size - lo) / (hi - lo)
        return None  # unreachable


class ArrivalRate:
    """EWMA of the arrival rate (rows per second) from inter-arrival times."""

    def __init__(self, now: Callable[[], float] = time.monotonic, alpha: float = 0.05):
        self.now, self.alpha = now, alpha
        self._last: float | None = None
        self.rows_per_s = 0.0
        self._gap_s: float | None = None

    def observe(self, rows: int) -> None:
        t = self.now()
        if self._last is not None:
            gap = max(t - self._last, 1e-7) / max(rows, 1)
            self._gap_s = gap if self._gap_s is None else self._gap_s + self.alpha * (gap - self._gap_s)
            self.rows_per_s = 1.0 / self._gap_s
        self._last = t


@dataclass(frozen=True, slots=True)
class Choice:
    batch_size: int
    wait_s: float
    throughput_rows_per_s: float
    explored: bool = False


class AdaptivePolicy:
    """Chooses the target batch size and wait from a profile.

    For every candidate size b: compute time c(b) from the profile, fill time
    f(b) = (b - 1) / arrival rate; feasible when f(b) + c(b) <= target; pick the feasible
    b with the highest throughput b / c(b) (larger b on ties), waiting up to f(b). Every
    `explore_every` choices an unmeasured candidate size (the smallest one above the
    measured range) is tried instead, so the profile grows where it matters.
    """

    def __init__(self, max_batch_size: int, target_latency_us: int,
                 candidates: tuple[int, ...] = (), explore_every: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.target_s = target_latency_us / 1e6
        sizes = set(candidates) | {max_batch_size}
        s = 1
        while s < max_batch_size:
            sizes.add(s)
            s *= 2
        self.candidates = tuple(sorted(x for x in sizes if 1 <= x <= max_batch_size))
        self.explore_every = explore_every
        self._count = 0

    def choose(self, profile: LatencyProfile, rows_per_s: float) -> Choice:
        self._count += 1
        measured = profile.measured()
        if not measured:
            # Nothing measured: run whatever is there at once and learn from it.
            return Choice(self.max_batch_size, 0.0, 0.0, explored=True)
        unmeasured = [b for b in self.candidates if b not in measured and b > max(measured)]
        if unmeasured and self.explore_every and self._count % self.explore_every == 0:
            b = unmeasured[0]
            wait_s = min(self._fill_s(b, rows_per_s, profile), self.target_s)
            return Choice(b, wait_s, 0.0, explored=True)
        best: Choice | None = None
        for b in self.candidates:
            compute_s = profile.estimate_s(b)
            fill_s = self._fill_s(b, rows_per_s, profile)
            if compute_s is None or fill_s + compute_s > self.target_s:
                continue
            throughput = b / compute_s if compute_s > 0 else float("inf")
            if best is None or throughput >= best.throughput_rows_per_s:
                best = Choice(b, fill_s, throughput)
        if best is None:
            # Even one row misses the target: run at once, as small as possible.
            return Choice(self.candidates[0], 0.0, 0.0)
        return best

    def plan(self, profile: LatencyProfile, rows_per_s: float) -> Plan:
        c = self.choose(profile, rows_per_s)
        return Plan(c.batch_size, c.wait_s)

    def _fill_s(self, b: int, rows_per_s: float, profile: LatencyProfile) -> float:
        """Time to gather b rows at the observed rate (0 when no rate is known yet)."""
        if rows_per_s <= 0:
            return 0.0
        return (b - 1) / rows_per_s
