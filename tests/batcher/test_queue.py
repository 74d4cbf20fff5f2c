"""The batch queue and its policy, with a controlled clock and no sleeping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from meshserve.batcher.queue import BatchPolicy, BatchQueue, Plan
from meshserve.batcher.records import Request, join_rows, raw_tensor
from meshserve.common.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidInput,
    Overloaded,
)


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
        value: float | None = None, width: int = 4, dtype=np.float32,
        request_id: int | None = None) -> Request:
    rid = next(_ids) if request_id is None else request_id
    x = np.full((rows, width), rid if value is None else value, dtype=dtype)
    name = {np.float32: "FP32", np.int32: "INT32"}[dtype]
    r = Request(
        request_id=rid, model="m", version="1",
        inputs=(raw_tensor("x", name, x.shape, x.tobytes()),), outputs=(), rows=rows,
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


# ---------------------------------------------------------------- shapes (dims: [-1])


def test_requests_of_different_shapes_are_never_joined():
    def body():
        clock = Clock()
        q = make_queue(clock)
        a20, b10, c30, d20 = req(q, width=20), req(q, width=10), req(q, width=30), req(q, width=20)
        batches = [q.take(i) for i in range(1, 4)]
        assert [ids(b) for b in batches] == [
            [a20.request_id, d20.request_id], [b10.request_id], [c30.request_id]]
        assert [b.inputs[0].shape for b in batches] == [(2, 20), (1, 10), (1, 30)]
        # Each batch holds exactly its requests' bytes, rows in order.
        rows = np.frombuffer(batches[0].inputs[0].data.tobytes(), np.float32).reshape(2, 20)
        assert rows[:, 0].tolist() == [a20.request_id, d20.request_id]
        assert q.take(4) is None and q.rows == 0
    run(body)


def test_same_shape_of_another_datatype_is_not_joined():
    def body():
        clock = Clock()
        q = make_queue(clock)
        f, i = req(q), req(q, dtype=np.int32)
        assert ids(q.take(1)) == [f.request_id]
        assert ids(q.take(2)) == [i.request_id]
    run(body)


def test_every_input_must_match_not_only_the_first():
    def body():
        clock = Clock()
        q = make_queue(clock)

        def two(width: int) -> Request:
            x = np.zeros((1, 4), np.float32)
            y = np.zeros((1, width), np.float32)
            r = Request(
                request_id=next(_ids), model="m", version="1",
                inputs=(raw_tensor("x", "FP32", x.shape, x.tobytes()),
                        raw_tensor("y", "FP32", y.shape, y.tobytes())),
                outputs=(), rows=1, level=1, enqueued_s=clock(), deadline_s=None,
                future=asyncio.get_running_loop().create_future())
            q.put(r)
            return r

        a, b, c = two(3), two(5), two(3)
        assert ids(q.take(1)) == [a.request_id, c.request_id]
        assert ids(q.take(2)) == [b.request_id]
    run(body)


def test_shape_groups_are_served_in_the_order_of_their_oldest_request():
    def body():
        clock = Clock()
        q = make_queue(clock, max_batch_size=2)
        order = [10, 20, 10, 30, 20, 10, 10, 30]
        rs = [req(q, width=w) for w in order]
        got = []
        while (batch := q.take(len(got) + 1)) is not None:
            got.append([order[rs.index(r)] for r in batch.requests])
        # Head first each time: the oldest request left decides the next batch's shape.
        assert got == [[10, 10], [20, 20], [30, 30], [10, 10]]
    run(body)


def test_a_higher_level_of_another_shape_goes_first():
    def body():
        clock = Clock()
        q = make_queue(clock, priority_levels=2, default_priority_level=2)
        low = req(q, width=10)
        high = req(q, width=20, priority=1)
        low_same = req(q, width=20)  # level 2, joins the level-1 head's batch after it
        assert ids(q.take(1)) == [high.request_id, low_same.request_id]
        assert ids(q.take(2)) == [low.request_id]
    run(body)


def test_full_and_preferred_are_judged_per_shape():
    def body():
        clock = Clock()
        q = make_queue(clock, preferred_batch_sizes=(4,))
        for _ in range(3):
            req(q, width=10)
        for _ in range(5):
            req(q, width=20)
        # 8 rows queued, but the head's shape has 3: not full, no preferred size reached.
        assert q.ready_in(idle=False) == pytest.approx(1e-3)
        req(q, width=10)
        assert q.ready_in(idle=False) == 0.0
        assert q.take(1).inputs[0].shape == (4, 10)
        # Now the 20-wide group is the head: 5 rows, a preferred batch of 4.
        assert q.ready_in(idle=False) == 0.0
        assert q.take(2).inputs[0].shape == (4, 20)
        assert q.take(3).inputs[0].shape == (1, 20)
    run(body)


def test_max_batch_size_is_honored_within_a_shape():
    def body():
        clock = Clock()
        q = make_queue(clock, max_batch_size=4)
        for w in [10, 20] * 6:
            req(q, width=w, rows=1)
        sizes = []
        while (batch := q.take(len(sizes) + 1)) is not None:
            sizes.append(batch.inputs[0].shape)
        assert sizes == [(4, 10), (4, 20), (2, 10), (2, 20)]
    run(body)


def test_deadlines_expire_in_every_shape_group():
    def body():
        clock = Clock()
        q = make_queue(clock)
        head = req(q, width=10)
        waiting = req(q, width=20, timeout_us=200)
        kept = req(q, width=20)
        assert q.ready_in(idle=False) == pytest.approx(200e-6)
        clock.advance_us(300)
        assert ids(q.take(1)) == [head.request_id]
        assert isinstance(waiting.future.exception(), DeadlineExceeded)
        assert ids(q.take(2)) == [kept.request_id]
        assert len(q) == 0 and q.rows == 0
    run(body)


def test_cancel_in_a_waiting_shape_group():
    def body():
        clock = Clock()
        q = make_queue(clock)
        a, b, c = req(q, width=10), req(q, width=20), req(q, width=20)
        assert q.cancel(b)
        assert ids(q.take(1)) == [a.request_id]
        assert ids(q.take(2)) == [c.request_id]
        assert q.take(3) is None
    run(body)


def test_request_ids_repeated_by_two_clients_are_two_requests():
    def body():
        clock = Clock()
        q = make_queue(clock)
        first = req(q, request_id=7, timeout_us=100)
        second = req(q, request_id=7)
        assert len(q) == 2
        assert ids(q.take(1)) == [7, 7]
        # The first one's deadline passing while it runs touches nothing queued.
        third = req(q, request_id=7)
        clock.advance_us(200)
        assert q.take(2).requests == (third,)
        assert not first.future.done() and not second.future.done()
    run(body)


def test_join_rows_refuses_parts_of_different_shapes():
    x, y = np.zeros((1, 20), np.float32), np.zeros((1, 10), np.float32)
    parts = [raw_tensor("x", "FP32", x.shape, x.tobytes()),
             raw_tensor("x", "FP32", y.shape, y.tobytes())]
    with pytest.raises(Internal, match=r"FP32 \[1, 20\] and FP32 \[1, 10\]"):
        join_rows(parts)


def test_a_reloaded_policy_keeps_queued_requests_in_order():
    def body():
        clock = Clock()
        q = make_queue(clock, max_batch_size=8, priority_levels=3, default_priority_level=3)
        low = [req(q, priority=3), req(q, priority=3)]
        mid = req(q, priority=2)
        q.set_policy(BatchPolicy(max_batch_size=2, max_queue_delay_us=1000, priority_levels=2,
                                 default_priority_level=2))
        # Level 3 is gone: its requests join level 2 after the older one there.
        assert ids(q.take(1)) == [low[0].request_id, low[1].request_id]
        assert ids(q.take(2)) == [mid.request_id]
        assert len(q) == 0 and q.level_of(2) == 2
    run(body)
