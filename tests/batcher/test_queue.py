"""The batch queue and its policy, with a controlled clock and no sleeping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from meshserve.batcher.queue import BatchPolicy, BatchQueue, Plan
from meshserve.batcher.records import Request, raw_tensor
from meshserve.common.errors import Cancelled, DeadlineExceeded, InvalidInput, Overloaded


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance_us(self, us: float) -> None:
        self.t += us / 1e6


def run(fn):
    """Runs a test body inside an event loop (requests carry asyncio futures)."""
    return asyncio.run(_call(fn))


async def _call(fn):
    return fn()


def make_queue(clock: Clock, **kw) -> BatchQueue:
    policy = BatchPolicy(**{"max_batch_size": 8, "max_queue_delay_us": 1000, **kw})
    return BatchQueue("m", "1", policy, now=clock)


_ids = iter(range(1, 1_000_000))


def req(q: BatchQueue, rows: int = 1, priority: int = 0, timeout_us: int = 0,
        value: float | None = None) -> Request:
    rid = next(_ids)
    x = np.full((rows, 4), rid if value is None else value, dtype=np.float32)
    r = Request(
        request_id=rid, model="m", version="1",
        inputs=(raw_tensor("x", "FP32", x.shape, x.tobytes()),), outputs=(), rows=rows,
        level=q.level_of(priority), enqueued_s=q.now(), deadline_s=q.deadline_of(timeout_us),
        future=asyncio.get_running_loop().create_future(),
    )
    q.put(r)
    return r


def ids(batch) -> list[int]:
    return [r.request_id for r in batch.requests]


def test_full_batch_closes_at_once():
    def body():
        clock = Clock()
        q = make_queue(clock)
        rs = [req(q) for _ in range(8)]
        assert q.ready_in(idle=False) == 0.0
        batch = q.take(1)
        assert ids(batch) == [r.request_id for r in rs]
        assert batch.rows == 8 and batch.inputs[0].shape == (8, 4)
        # Inputs joined in order: row i holds request i's values.
        rows = np.frombuffer(batch.inputs[0].data.tobytes(), np.float32).reshape(8, 4)
        assert rows[:, 0].tolist() == [float(r.request_id) for r in rs]
    run(body)


def test_window_expiry_closes_a_partial_batch():
    def body():
        clock = Clock()
        q = make_queue(clock)
        req(q)
        clock.advance_us(300)
        req(q)
        assert q.ready_in(idle=False) == pytest.approx(700e-6)
        clock.advance_us(699)
        assert q.ready_in(idle=False) > 0
        clock.advance_us(1)
        assert q.ready_in(idle=False) == 0.0
        assert q.take(1).rows == 2
        assert q.ready_in(idle=False) is None
    run(body)


def test_preferred_size_closes_early_at_that_size():
    def body():
        clock = Clock()
        q = make_queue(clock, preferred_batch_sizes=(4,))
        for _ in range(3):
            req(q)
        assert q.ready_in(idle=False) > 0
        for _ in range(2):
            req(q)
        assert q.ready_in(idle=False) == 0.0
        assert q.take(1).rows == 4
        assert len(q) == 1
    run(body)


def test_higher_priority_level_goes_first_fifo_within_a_level():
    def body():
        clock = Clock()
        q = make_queue(clock, max_batch_size=3, priority_levels=2, default_priority_level=2)
        low = [req(q) for _ in range(3)]  # default level 2
        high = [req(q, priority=1) for _ in range(2)]
        first = q.take(1)
        assert ids(first) == [high[0].request_id, high[1].request_id, low[0].request_id]
        assert ids(q.take(2)) == [low[1].request_id, low[2].request_id]
        with pytest.raises(InvalidInput, match="priority 3"):
            q.level_of(3)
    run(body)


def test_expired_request_is_answered_deadline_exceeded_and_never_batched():
    def body():
        clock = Clock()
        q = make_queue(clock)
        short = req(q, timeout_us=200)
        other = req(q)
        # The wait is cut to the earliest deadline.
        assert q.ready_in(idle=False) == pytest.approx(200e-6)
        clock.advance_us(250)
        q.ready_in(idle=False)
        assert isinstance(short.future.exception(), DeadlineExceeded)
        batch = q.take(1)
        assert ids(batch) == [other.request_id]
    run(body)


def test_default_timeout_applies_and_a_request_may_only_shorten_it():
    def body():
        clock = Clock()
        q = make_queue(clock, default_timeout_us=1000)
        assert q.deadline_of(0) == pytest.approx(clock.t + 1e-3)
        assert q.deadline_of(500) == pytest.approx(clock.t + 5e-4)
        assert q.deadline_of(5000) == pytest.approx(clock.t + 1e-3)
    run(body)


def test_cancelled_request_is_dropped_and_the_rest_still_batch():
    def body():
        clock = Clock()
        q = make_queue(clock)
        a, b, c = req(q), req(q), req(q)
        assert q.cancel(b)
        assert isinstance(b.future.exception(), Cancelled)
        assert q.rows == 2
        batch = q.take(1)
        assert ids(batch) == [a.request_id, c.request_id]
        assert batch.inputs[0].shape == (2, 4)
    run(body)


def test_overflow_is_resource_exhausted_with_depth_and_limit():
    def body():
        clock = Clock()
        q = make_queue(clock, max_queue_size=3)
        for _ in range(3):
            req(q)
        with pytest.raises(Overloaded, match="3 requests queued, limit 3"):
            req(q)
        assert len(q) == 3
    run(body)


def test_rows_of_one_request_never_split():
    def body():
        clock = Clock()
        q = make_queue(clock)
        a = req(q, rows=5)
        b = req(q, rows=4)  # 5 + 4 > 8: waits for the next batch
        c = req(q, rows=2)
        first = q.take(1)
        assert ids(first) == [a.request_id] and first.rows == 5
        second = q.take(2)
        assert ids(second) == [b.request_id, c.request_id] and second.rows == 6
        with pytest.raises(InvalidInput, match="more than the max_batch_size 8"):
            req(q, rows=9)
    run(body)


def test_lone_request_goes_at_once_when_a_worker_is_idle():
    def body():
        clock = Clock()
        q = make_queue(clock)
        req(q)
        assert q.ready_in(idle=True) == 0.0
        assert q.ready_in(idle=False) == pytest.approx(1e-3)
    run(body)


def test_plan_overrides_target_and_wait():
    def body():
        clock = Clock()
        q = make_queue(clock)
        for _ in range(3):
            req(q)
        plan = Plan(target_rows=3, max_wait_s=0.0)
        assert q.ready_in(idle=False, plan=Plan(4, 0.01)) == pytest.approx(0.01)
        assert q.ready_in(idle=False, plan=plan) == 0.0
        assert q.take(1, plan=Plan(2, 0.0)).rows == 2
    run(body)


def test_next_batch_waits_on_events_not_polls():
    async def body():
        q = BatchQueue("m", "1", BatchPolicy(max_batch_size=4, max_queue_delay_us=10_000_000))
        waiting = asyncio.ensure_future(q.wait_nonempty())
        await asyncio.sleep(0)
        req(q)
        await asyncio.wait_for(waiting, 5)
        # A 10 s window: the batch closes as soon as the 4th request fills it.
        task = asyncio.ensure_future(q.next_batch(1, idle=lambda: False))
        await asyncio.sleep(0)
        assert not task.done()
        for _ in range(3):
            req(q)
        batch = await asyncio.wait_for(task, 5)
        assert batch.rows == 4
        # Emptied by a cancel while waiting: returns None.
        r = req(q)
        task = asyncio.ensure_future(q.next_batch(2, idle=lambda: False))
        await asyncio.sleep(0)
        q.cancel(r)
        assert await asyncio.wait_for(task, 5) is None
    asyncio.run(body())


def test_policy_rejects_invalid_values():
    with pytest.raises(ValueError, match="max_queue_size"):
        BatchPolicy(max_batch_size=4, max_queue_size=0)
    with pytest.raises(ValueError, match="default_priority_level"):
        BatchPolicy(max_batch_size=4, priority_levels=1, default_priority_level=2)
