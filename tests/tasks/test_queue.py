"""The task queues and runner without gRPC: the in-memory queue and Redis Streams (a real
redis-server), with a fake executor standing in for the gateway's path."""

from __future__ import annotations

import asyncio

import pytest
import redis

from meshserve.common.errors import InvalidInput, NotFound, Overloaded, Unavailable
from meshserve.tasks.core import AsyncTasks
from meshserve.tasks.queues import GROUP, DeadLetter, MemoryQueue, RedisQueue
from meshserve.tasks.records import NewTask, QueueSettings, Started, State, now_ms
from meshserve.tasks.runner import Runner


@pytest.fixture(params=["memory", "redis"])
def make_queue(request):
    urls = []
    if request.param == "redis":
        urls.append(request.getfixturevalue("redis_server").url)

    def make(clock=now_ms, **settings):
        s = QueueSettings(**settings)
        return RedisQueue(urls[0], s, clock=clock) if urls else MemoryQueue(s, clock=clock)
    return make


class Clock:
    """A wall clock in ms that moves only when told (deadlines and TTLs without sleeps)."""

    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


class Executor:
    """Echoes the request; records every run; can hold runs until released."""

    def __init__(self, fail_first: int = 0):
        self.runs: list[bytes] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_first = fail_first

    async def __call__(self, request: bytes, timeout_s: float) -> bytes:
        self.runs.append(request)
        await self.gate.wait()
        if len(self.runs) <= self.fail_first:
            raise Unavailable("the batcher is unavailable")
        if request == b"bad":
            raise InvalidInput("bad request")
        return b"out:" + request


def run(make_queue, test, clock=now_ms, **settings):
    async def main():
        queue = make_queue(clock, **settings)
        await queue.start()
        try:
            await test(queue, AsyncTasks(queue))
        finally:
            await queue.close()
    asyncio.run(asyncio.wait_for(main(), 30))


async def wait_done(tasks: AsyncTasks, task_id: str):
    return [v async for v in tasks.watch(task_id)][-1]


def test_submit_run_watch_and_errors(make_queue):
    async def test(queue, tasks):
        ex = Executor()
        ex.gate.clear()
        [tid, bad] = await tasks.submit([NewTask(b"a"), NewTask(b"bad")])
        assert (await tasks.get(tid)).state == State.PENDING
        runner = Runner(queue, ex, concurrency=4)
        runner.start()
        states = []

        async def watch():
            async for view in tasks.watch(tid):
                states.append(view.state)
                if view.state == State.RUNNING:
                    ex.gate.set()
        await watch()
        assert states[-1] == State.SUCCEEDED and State.RUNNING in states
        assert len(states) == len(set(states))  # one item per change
        done = await tasks.get(tid)
        assert done.response == b"out:a" and done.finished_ms >= done.submitted_ms > 0
        failed = await wait_done(tasks, bad)
        assert (failed.state, failed.error_code, failed.error_message) == (
            State.FAILED, 3, "bad request")  # INVALID_ARGUMENT
        assert sorted(ex.runs) == [b"a", b"bad"]
        assert await queue.length() == 0
        await runner.stop(1)
        with pytest.raises(NotFound):
            await tasks.get("0" * 32)
        with pytest.raises(NotFound):
            await tasks.get("not-a-task")
        with pytest.raises(InvalidInput):
            await tasks.get("")
    run(make_queue, test)


def test_idempotent_resubmit_and_queue_bound(make_queue):
    async def test(queue, tasks):
        first = await tasks.submit([NewTask(b"x", "key-1")])
        again = await tasks.submit([NewTask(b"y", "key-1"), NewTask(b"z", "key-1")])
        assert again == first * 2
        await tasks.submit([NewTask(b"2"), NewTask(b"3")])
        assert await queue.length() == 3
        with pytest.raises(Overloaded, match="3 tasks queued.*bound of 3"):
            await tasks.submit([NewTask(b"4")])
        with pytest.raises(Overloaded):  # all or none
            await tasks.submit([NewTask(b"4", "key-2"), NewTask(b"x", "key-1")])
        assert await queue.length() == 3
        assert await tasks.submit([NewTask(b"x", "key-1")]) == first  # no room needed
        with pytest.raises(InvalidInput):
            await tasks.submit([NewTask(b"x", "k" * 300)])
    run(make_queue, test, max_queue=3)


def test_cancelled_task_is_never_run(make_queue):
    async def test(queue, tasks):
        [cancelled, kept] = await tasks.submit([NewTask(b"c"), NewTask(b"k")])
        view = await tasks.cancel(cancelled)
        assert view.state == State.CANCELLED and view.error_code == 1
        assert (await tasks.cancel(cancelled)).state == State.CANCELLED  # idempotent
        assert await queue.length() == 1
        ex = Executor()
        runner = Runner(queue, ex)
        runner.start()
        assert (await wait_done(tasks, kept)).state == State.SUCCEEDED
        await runner.stop(1)
        assert ex.runs == [b"k"]
        assert (await tasks.get(cancelled)).state == State.CANCELLED
    run(make_queue, test)


def test_deadline_and_result_ttl_expiry(make_queue):
    clock = Clock()

    async def test(queue, tasks):
        [waited] = await tasks.submit([NewTask(b"w", timeout_s=0.05)])
        assert (await tasks.get(waited)).state == State.PENDING
        clock.advance(0.1)
        assert (await tasks.get(waited)).state == State.EXPIRED  # past its deadline
        [done] = await tasks.submit([NewTask(b"d")])
        ex = Executor()
        runner = Runner(queue, ex)
        runner.start()
        finished = await wait_done(tasks, done)
        assert finished.state == State.SUCCEEDED
        await runner.stop(1)
        assert ex.runs == [b"d"]  # the expired task never ran
        expired = await tasks.get(waited)
        assert expired.state == State.EXPIRED and expired.error_code == 4
        assert (await tasks.get(done)).state == State.SUCCEEDED
        clock.advance(1.05)  # result TTL
        gone = await tasks.get(done)
        assert gone.state == State.EXPIRED and gone.response == b""
        clock.advance(1.0)  # twice the result TTL: forgotten
        if queue.durable:
            await asyncio.sleep(2.1)  # Redis expires the keys by its own clock
        with pytest.raises(NotFound):
            await tasks.get(done)
    run(make_queue, test, clock, result_ttl_s=1.0)


def test_100k_tasks_from_one_key_stop_at_its_quota(make_queue):
    """Both backends: a key holds at most max_per_key tasks (waiting, running, or finished
    and kept for twice the result TTL), refused RESOURCE_EXHAUSTED past it, all or none;
    other keys and keyless tasks are not affected; a task frees its place once forgotten,
    and a finished or cancelled one is forgotten twice the result TTL after it ended."""
    clock = Clock()

    async def test(queue, tasks):
        accepted, why = 0, ""
        while accepted < 100_000:
            try:
                accepted += len(await queue.submit([NewTask(b"r", owner="key-a")] * 10))
            except Overloaded as e:
                why = str(e)
                break
        assert accepted == 50
        assert "this API key holds 50 tasks" in why and "at most 50" in why
        assert len(await queue.submit([NewTask(b"r", owner="key-b")] * 50)) == 50
        assert len(await queue.submit([NewTask(b"r")] * 60)) == 60  # no key: no quota
        with pytest.raises(Overloaded, match="holds 50 tasks"):  # key-b's; all or none
            await queue.submit([NewTask(b"r", owner="key-c")] * 45
                               + [NewTask(b"r", owner="key-b")])
        assert len(await queue.submit([NewTask(b"r", owner="key-c")] * 50)) == 50
        # key-a's first 3 finish (begun by a runner), the next 2 are cancelled.
        deliveries = await queue.read("c1", 5, 0.1)
        for d in deliveries[:3]:
            assert isinstance(await queue.begin(d), Started)
            assert await queue.finish(d, State.SUCCEEDED, b"out", 0, "")
        for d in deliveries[3:]:
            assert (await queue.cancel(d.task_id)).state == State.CANCELLED
        views = [await queue.get(d.task_id) for d in deliveries]
        assert all(v.owner == "key-a" and v.state.done for v in views)
        with pytest.raises(Overloaded):
            await queue.submit([NewTask(b"r", owner="key-a")])  # finished ones still count
        clock.advance(2.5)  # past twice the result TTL of the 5 ended, not the others' deadline
        assert len(await queue.submit([NewTask(b"r", owner="key-a")] * 5)) == 5
        with pytest.raises(Overloaded, match="holds 50 tasks"):
            await queue.submit([NewTask(b"r", owner="key-a")])
        clock.advance(100 + 2)  # every task's deadline and twice the result TTL
        assert len(await queue.submit([NewTask(b"r", owner="key-a")] * 50)) == 50
    run(make_queue, test, clock, max_per_key=50, max_queue=1000, task_ttl_s=100,
        result_ttl_s=1.0)


def test_transient_failure_is_retried_then_succeeds(make_queue):
    async def test(queue, tasks):
        ex = Executor(fail_first=1)
        runner = Runner(queue, ex)
        runner.start()
        [tid] = await tasks.submit([NewTask(b"r")])
        view = await wait_done(tasks, tid)
        await runner.stop(1)
        assert view.state == State.SUCCEEDED and view.response == b"out:r"
        assert ex.runs == [b"r", b"r"]
    run(make_queue, test, claim_idle_s=0.3)


def test_a_task_failing_every_time_is_dead_lettered_after_max_deliveries(make_queue):
    """Both backends: a transient failure is retried (a new delivery) until max_deliveries
    deliveries ran; the next is dead-lettered and the task FAILED with the last error."""
    async def test(queue, tasks):
        ex = Executor(fail_first=100)
        runner = Runner(queue, ex)
        runner.start()
        [tid, ok] = await tasks.submit([NewTask(b"p"), NewTask(b"s")])
        view = await wait_done(tasks, tid)
        assert (await wait_done(tasks, ok)).state == State.FAILED  # it failed as often
        await runner.stop(1)
        assert view.state == State.FAILED and view.error_code == 14  # UNAVAILABLE
        why = "gave up after 2 deliveries: the batcher is unavailable"
        assert view.error_message == why
        assert ex.runs.count(b"p") == 2
        dead = sorted(await queue.dead_letters(), key=lambda d: d.task_id)
        assert dead == sorted([DeadLetter(tid, 3, why), DeadLetter(ok, 3, why)],
                              key=lambda d: d.task_id)
        assert await queue.length() == 0
    run(make_queue, test, claim_idle_s=0.2, max_deliveries=2)


def test_dead_runners_task_is_claimed_and_dead_lettered(redis_server):
    """Redis: an entry read by a runner that died is claimed after claim_idle_s and run
    once; past max_deliveries a task goes to the dead-letter stream, FAILED."""
    r = redis.Redis.from_url(redis_server.url)

    async def main():
        queue = RedisQueue(redis_server.url, QueueSettings(claim_idle_s=0.3, max_deliveries=2))
        await queue.start()
        tasks = AsyncTasks(queue)
        [survivor, poison] = await tasks.submit([NewTask(b"s"), NewTask(b"p")])
        deliveries = {d.task_id: d for d in await queue.read("dead-1", 2, 1)}
        assert await queue.begin(deliveries[poison]) is not None  # RUNNING; the runner dies
        await asyncio.sleep(0.35)
        # Another runner claims the poison task (2nd delivery) and dies too.
        r.xclaim(queue.stream, GROUP, "dead-2", 300, [deliveries[poison].entry_id])
        ex = Executor()
        runner = Runner(queue, ex)
        runner.start()
        views = {t: await wait_done(tasks, t) for t in (survivor, poison)}
        await runner.stop(1)
        await queue.close()
        return views, ex.runs, survivor, poison
    views, runs, survivor, poison = asyncio.run(asyncio.wait_for(main(), 30))
    assert views[survivor].state == State.SUCCEEDED and runs == [b"s"]
    assert views[poison].state == State.FAILED and views[poison].error_code == 13
    assert "gave up after 2 deliveries" in views[poison].error_message
    [(_id, fields)] = r.xrange("meshserve:tasks:dead")
    assert fields[b"t"].decode() == poison and fields[b"deliveries"] == b"3"
    assert r.xlen("meshserve:tasks:queue") == 0
    assert r.xpending("meshserve:tasks:queue", GROUP)["pending"] == 0
    assert r.hget(f"meshserve:tasks:task:{survivor}", "finishes") == b"1"
