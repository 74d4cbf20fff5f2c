"""The batcher core with fake worker links (isolates retries, cancellation, errors)."""

from __future__ import annotations

import asyncio

import numpy as np

from meshserve.batcher.core import Batcher, BatcherOptions, Session
from meshserve.batcher.records import BatchReply, RawTensor, raw_tensor
from meshserve.batcher.workers import HeldModel, WorkerPool, WorkerReport
from meshserve.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
)
from meshserve.common.repository import ModelRepository

KEY = ("digits", "2")


class FakeLink:
    """Echoes the batch's input as output 'logits'; `gate` holds execution; `fail` makes
    the next executions fail with the given errors (an exception is raised when it is
    Unavailable, as a broken stream does; other errors come back as a batch result)."""

    def __init__(self, address: str):
        self.address = address
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: list[Exception] = []
        self.batches: list = []
        self.reloads: list = []
        self.reload_error: Exception | None = None
        self.reload_failing = {"1", "2"}  # versions the reload_error applies to
        self.reload_gates: dict[str, asyncio.Event] = {}
        self.unloads: list = []

    async def execute(self, batch) -> BatchReply:
        self.batches.append(batch)
        await self.gate.wait()
        if self.fail:
            error = self.fail.pop(0)
            if isinstance(error, Unavailable):
                raise error
            return BatchReply(error, (), 0, 0)
        x = batch.inputs[0]
        out = RawTensor("logits", x.datatype, x.shape, x.data)
        return BatchReply(None, (out,), 1000, batch.rows)

    async def load(self, model, version, reload=False):
        if not reload:
            raise AssertionError("no load expected")
        self.reloads.append((model, version))
        await self.reload_gates.get(version, self.gate).wait()
        if self.reload_error is not None and version in self.reload_failing:
            raise self.reload_error

    async def unload(self, model, version):
        self.unloads.append((model, version))


def setup(models_dir, n_workers: int = 1, **options):
    pool = WorkerPool()
    links = []
    for i in range(n_workers):
        link = FakeLink(f"w{i}")
        pool.add(link, max_in_flight=2)
        report = WorkerReport("w", "cpu", (HeldModel("digits", "2", "READY"),), 0, 0, 8, 0)
        pool.update(link.address, report, connected=True)
        links.append(link)
    batcher = Batcher(ModelRepository(models_dir), pool, BatcherOptions(max_retries=2, **options))
    return batcher, links


def row(value: float, n: int = 1):
    x = np.full((n, 64), value, np.float32)
    return [raw_tensor("input", "FP32", x.shape, x.tobytes())]


def first_value(result) -> float:
    return float(np.frombuffer(result.outputs[0].data.tobytes(), np.float32)[0])


def test_cancelled_caller_inside_a_batch_does_not_hold_the_others(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        link.gate.clear()
        a, b, c = (batcher.submit(i, "digits", "2", row(i), [], 0, 0) for i in (1, 2, 3))
        while not link.batches:
            await asyncio.sleep(0)
        assert [r.request_id for r in link.batches[0].requests] == [1, 2, 3]
        batcher.cancel(b)
        assert isinstance(b.future.result().error, Cancelled)
        link.gate.set()
        ra, rc = await asyncio.wait_for(asyncio.gather(a.future, c.future), 5)
        assert (first_value(ra), first_value(rc)) == (1.0, 3.0)
        assert ra.batch_size == 3 and ra.outputs[0].shape == (1, 64)
        await batcher.close()
    asyncio.run(body())


def test_not_found_from_a_worker_is_retried_elsewhere_and_marks_drift(models_dir):
    async def body():
        batcher, (w0, w1) = setup(models_dir, 2)
        w0.fail = [NotFound("model digits version 2 is not loaded")]
        w1.gate.clear()  # busy: the first batch goes to w0 (least outstanding, then name)
        r = batcher.submit(1, "digits", "2", row(5.0, 2), [], 0, 0)
        while not w0.batches:
            await asyncio.sleep(0)
        w1.gate.set()
        result = await asyncio.wait_for(r.future, 5)
        assert result.error is None and first_value(result) == 5.0
        assert len(w0.batches) == 1 and len(w1.batches) == 1
        assert KEY in batcher.pool.workers["w0"].drifted
        assert [w.address for w in batcher.pool.holders(KEY)] == ["w1"]
        await batcher.close()
    asyncio.run(body())


def test_broken_stream_is_retried_on_another_worker_and_answered_once(models_dir):
    async def body():
        batcher, (w0, w1) = setup(models_dir, 2)
        w0.fail = [Unavailable("model worker w0 disconnected with the batch in flight")]
        w1.fail = [Unavailable("model worker w1 disconnected with the batch in flight")]
        results = []
        session = Session(batcher)
        session.submit(7, "digits", "2", row(7.0), [], 0, 0)
        while not results:
            results += (await asyncio.wait_for(session.drain(), 5))[0]
        [result] = results
        assert result.error is None and first_value(result) == 7.0
        assert len(w0.batches) + len(w1.batches) == 3  # two failures, then success
        await batcher.close()
    asyncio.run(body())


def test_retries_are_bounded(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        link.fail = [Unavailable("broken")] * 5
        r = batcher.submit(1, "digits", "2", row(1.0), [], 0, 0)
        result = await asyncio.wait_for(r.future, 5)
        assert isinstance(result.error, Unavailable)
        assert "no model worker is serving digits version 2" in str(result.error)
        assert len(link.batches) == 3  # 1 + --max-retries 2
        await batcher.close()
    asyncio.run(body())


def _reconnect(pool: WorkerPool, address: str) -> None:
    report = WorkerReport("w", "cpu", (HeldModel("digits", "2", "READY"),), 0, 0, 8, 0)
    pool.update(address, report, connected=True)


def test_requests_wait_for_a_restarting_worker_and_are_answered_once(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        # the only worker dies with a batch in flight, and is restarted a moment later
        link.fail = [Unavailable("model worker w0 disconnected with the batch in flight")]
        link.gate.clear()
        in_flight = batcher.submit(1, "digits", "2", row(1.0), [], 0, 0)
        while not link.batches:
            await asyncio.sleep(0)
        batcher.pool.update("w0", None, connected=False)
        link.gate.set()  # its stream breaks: the batch comes back Unavailable
        queued = batcher.submit(2, "digits", "2", row(2.0), [], 0, 0)
        await asyncio.sleep(0.05)
        assert not in_flight.future.done() and not queued.future.done()
        _reconnect(batcher.pool, "w0")
        a, b = await asyncio.wait_for(asyncio.gather(in_flight.future, queued.future), 5)
        assert a.error is None and first_value(a) == 1.0
        assert b.error is None and first_value(b) == 2.0
        assert len(link.batches) == 3  # the failed one, its retry, the queued one
        await batcher.close()
    asyncio.run(body())


def test_a_worker_that_does_not_come_back_is_unavailable_after_the_rejoin_wait(models_dir):
    async def body():
        batcher, [link] = setup(models_dir, rejoin_wait_s=0.2)
        batcher.pool.update("w0", None, connected=False)
        r = batcher.submit(1, "digits", "2", row(1.0), [], 0, 0)
        await asyncio.sleep(0.05)
        assert not r.future.done()
        result = await asyncio.wait_for(r.future, 5)
        assert isinstance(result.error, Unavailable)
        assert "no model worker is connected (1 known)" in str(result.error)
        # past the wait, a request is refused at once
        later = batcher.submit(2, "digits", "2", row(2.0), [], 0, 0)
        await asyncio.sleep(0.01)
        assert isinstance(later.future.result().error, Unavailable)
        await batcher.close()
    asyncio.run(body())


def test_a_deadline_ends_the_wait_for_a_worker(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        batcher.pool.update("w0", None, connected=False)
        r = batcher.submit(1, "digits", "2", row(1.0), [], 0, 100_000)  # 100 ms
        result = await asyncio.wait_for(r.future, 5)
        assert result.error is not None and result.error.code_name == "DEADLINE_EXCEEDED"
        await batcher.close()
    asyncio.run(body())


def test_invalid_argument_from_a_worker_goes_to_the_batch_without_retry(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        link.fail = [InvalidInput("input 'input': bad values")]
        r = batcher.submit(1, "digits", "2", row(1.0), [], 0, 0)
        result = await asyncio.wait_for(r.future, 5)
        assert isinstance(result.error, InvalidInput) and "bad values" in str(result.error)
        assert len(link.batches) == 1
        await batcher.close()
    asyncio.run(body())


def test_closing_a_session_cancels_its_queued_requests(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        link.gate.clear()
        session = Session(batcher)
        for i in range(1, 7):  # 1 batch runs, the rest wait for a slot or queue
            session.submit(i, "digits", "2", row(i), [], 0, 0)
        await asyncio.sleep(0)
        session.close()
        results, _received = await asyncio.wait_for(session.drain(), 5)
        assert sorted(r.request_id for r in results) == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(r.error, Cancelled) for r in results)
        assert not session.pending
        link.gate.set()
        await asyncio.sleep(0)
        await batcher.close()
    asyncio.run(body())


def test_messages_are_acknowledged_and_withdrawn_requests_are_no_failures(models_dir):
    """Flow control: each message read is acknowledged with the next drain, alone or with
    results. A withdrawn request (the gateway's cache had the answer) is dropped like a
    cancelled one but does not count as a failure."""
    async def body():
        batcher, [link] = setup(models_dir)
        link.gate.clear()
        session = Session(batcher)
        session.received()
        session.received()
        assert await asyncio.wait_for(session.drain(), 5) == ([], 2)
        for i in range(1, 7):  # 1 batch runs, the rest queue
            session.submit(i, "digits", "2", row(i), [], 0, 0)
        await asyncio.sleep(0)
        session.cancel(5)
        session.cancel(6, withdrawn=True)
        results, received = await asyncio.wait_for(session.drain(), 5)
        assert received == 0
        assert sorted(r.request_id for r in results) == [5, 6]
        assert all(isinstance(r.error, Cancelled) for r in results)
        link.gate.set()
        answered = []
        while len(answered) < 4:
            answered += (await asyncio.wait_for(session.drain(), 5))[0]
        [stats] = batcher.statistics("digits", "2")
        assert stats.fail.count == 1  # 5 only
        assert stats.success.count == 4
        await batcher.close()
    asyncio.run(body())


def test_loading_a_loaded_version_reloads_it_on_every_holder(models_dir):
    async def body():
        batcher, links = setup(models_dir, n_workers=2)
        states = await batcher.load_model("digits", ["2"])
        assert [(s.version, s.state, s.workers) for s in states] == [("2", "READY", ("w0", "w1"))]
        assert [link.reloads for link in links] == [[KEY], [KEY]]
        assert [link.unloads for link in links] == [[], []]
        await batcher.close()
    asyncio.run(body())


def test_a_holder_whose_reload_failed_drops_the_version(models_dir):
    async def body():
        batcher, (w0, w1) = setup(models_dir, n_workers=2)
        w1.reload_error = InvalidInput("model.pt: not a loadable TorchScript file")
        await batcher.load_model("digits", ["2"])
        # Every answer comes from the new files: w1 (still on the old ones) drops it.
        assert (w0.unloads, w1.unloads) == ([], [KEY])
        await batcher.close()
    asyncio.run(body())


def test_a_reload_failed_everywhere_is_failed_precondition_and_keeps_serving(models_dir):
    async def body():
        batcher, links = setup(models_dir, n_workers=2)
        for link in links:
            link.reload_error = InvalidInput("model.pt: not a loadable TorchScript file")
        try:
            await batcher.load_model("digits", ["2"])
        except FailedPrecondition as e:
            assert "previous files keep serving" in str(e) and "TorchScript" in str(e)
        else:
            raise AssertionError("no error")
        assert [link.unloads for link in links] == [[], []]
        r = batcher.submit(1, "digits", "2", row(5.0), [], 0, 0)
        assert first_value(await asyncio.wait_for(r.future, 5)) == 5.0
        await batcher.close()
    asyncio.run(body())


def test_a_failed_version_is_raised_only_once_every_version_swapped(models_dir):
    async def body():
        batcher, [link] = setup(models_dir)
        both = (HeldModel("digits", "1", "READY"), HeldModel("digits", "2", "READY"))
        batcher.pool.update(link.address, WorkerReport("w", "cpu", both, 0, 0, 8, 0),
                            connected=True)
        link.reload_error = InvalidInput("model.pt: not a loadable TorchScript file")
        link.reload_failing = {"2"}
        link.reload_gates["1"] = asyncio.Event()  # version 1 is still warming up
        load = asyncio.ensure_future(batcher.load_model("digits", ["1", "2"]))
        while len(link.reloads) < 2:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not load.done()  # version 2 failed, but version 1 has not swapped yet
        link.reload_gates["1"].set()
        try:
            await asyncio.wait_for(load, 5)
        except FailedPrecondition as e:
            assert "version 2" in str(e)
        else:
            raise AssertionError("no error")
        await batcher.close()
    asyncio.run(body())


def test_a_reload_gives_the_queue_the_new_config(models_dir, tmp_path):
    import json
    import shutil

    async def body():
        shutil.copytree(models_dir / "digits", tmp_path / "digits")
        batcher, [link] = setup(tmp_path)
        link.gate.clear()
        queued = [batcher.submit(i, "digits", "2", row(i), [], 0, 0) for i in (1, 2)]
        path = tmp_path / "digits" / "config.json"
        config = json.loads(path.read_text())
        config["batching"]["priority_levels"] = 3
        config["batching"]["max_queue_delay_us"] = 7000
        path.write_text(json.dumps(config))
        link.gate.set()
        await batcher.load_model("digits", ["2"])
        mq = batcher._queues[KEY]
        assert mq.config.batching.priority_levels == 3
        assert mq.queue.policy.max_queue_delay_us == 7000
        r = batcher.submit(3, "digits", "2", row(3.0), [], 3, 0)  # a level the old one lacked
        results = await asyncio.wait_for(asyncio.gather(*(q.future for q in [*queued, r])), 5)
        assert [first_value(x) for x in results] == [1.0, 2.0, 3.0]
        await batcher.close()
    asyncio.run(body())
