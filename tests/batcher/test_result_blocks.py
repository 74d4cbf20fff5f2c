"""Results travel to the gateway as one block per batch (the rows of its requests joined,
one tensor per output), and the gateway's client splits them back per request: the
batcher core with a fake worker link, two sessions (two gateways) sharing one batch."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from meshserve.batcher import convert
from meshserve.batcher.client import deliver_block
from meshserve.batcher.core import Batcher, BatcherOptions, Session
from meshserve.batcher.records import BatchReply, RawTensor, raw_tensor
from meshserve.batcher.workers import HeldModel, WorkerPool, WorkerReport
from meshserve.common.errors import Unavailable
from meshserve.common.repository import ModelRepository
from meshserve.common.tensors import from_pb
from meshserve.pb.meshserve.v1 import batcher_pb2


class TwoOutputs:
    """A worker link answering "logits" (the input's rows) and "predictions" (each row's
    first value, INT64), or only those of them the batch asks for; `gate` holds it."""

    address = "w0"

    def __init__(self):
        self.gate = asyncio.Event()
        self.batches: list = []

    async def execute(self, batch) -> BatchReply:
        self.batches.append(batch)
        await self.gate.wait()
        x = batch.inputs[0]
        values = np.frombuffer(x.data.tobytes(), np.float32).reshape(x.shape)
        predictions = values.reshape(len(values), -1)[:, 0].astype(np.int64)
        outputs = [RawTensor("logits", "FP32", x.shape, x.data),
                   RawTensor("predictions", "INT64", predictions.shape,
                             np.frombuffer(predictions.tobytes(), np.uint8))]
        wanted = [t for t in outputs if not batch.outputs or t.name in batch.outputs]
        return BatchReply(None, tuple(wanted), 1000, batch.rows)


def batcher_of(repository: ModelRepository, model: str) -> tuple[Batcher, TwoOutputs]:
    pool = WorkerPool()
    link = TwoOutputs()
    pool.add(link, max_in_flight=1)
    pool.update(link.address, WorkerReport("w", "cpu", (HeldModel(model, "2", "READY"),),
                                           0, 0, 8, 0), connected=True)
    return Batcher(repository, pool, BatcherOptions()), link


def rows_of(value: float, n: int, shape=(64,)) -> list[RawTensor]:
    x = np.full((n, *shape), value, np.float32)
    return [raw_tensor("input", "FP32", x.shape, x.tobytes())]


async def delivered(message: batcher_pb2.InferResults, ids: list[int]) -> dict[int, object]:
    """What the gateway's stream reader hands each pending request of the message."""
    loop = asyncio.get_running_loop()
    pending = {i: loop.create_future() for i in ids}
    futures = dict(pending)
    for r in message.results:
        pending.pop(r.request_id).set_result(r)
    for b in message.blocks:
        deliver_block(b, pending, "batcher")
    assert not pending, f"requests left unanswered: {sorted(pending)}"
    return {i: f.result() if f.exception() is None else f.exception()
            for i, f in futures.items()}


async def drained(session: Session) -> tuple[list, int]:
    results, received = await asyncio.wait_for(session.drain(), 5)
    return results, received


def outputs(result) -> dict[str, np.ndarray]:
    return {t.name: from_pb(t) for t in result.outputs}


def test_a_batch_shared_by_two_gateways_gets_each_row_and_filter_right(models_dir):
    async def body():
        batcher, link = batcher_of(ModelRepository(models_dir), "digits")
        a, b = Session(batcher), Session(batcher)
        # Interleaved: A's requests are rows 0, 3 and 5-6 of the batch; B's 1-2 and 4.
        a.submit(1, "digits", "2", rows_of(1, 1), ["logits"], 0, 0)
        b.submit(2, "digits", "2", rows_of(2, 2), ["predictions"], 0, 0)
        a.submit(3, "digits", "2", rows_of(3, 1), [], 0, 0)
        b.submit(4, "digits", "2", rows_of(4, 1), ["logits"], 0, 0)
        a.submit(5, "digits", "2", rows_of(5, 2), ["predictions"], 0, 0)
        while not link.batches:
            await asyncio.sleep(0)
        [batch] = link.batches
        assert [r.request_id for r in batch.requests] == [1, 2, 3, 4, 5] and batch.rows == 7
        b.cancel(4, withdrawn=True)  # withdrawn while its batch computes
        link.gate.set()
        (results_a, _), (results_b, _) = await drained(a), await drained(b)
        assert sorted(r.request_id for r in results_a) == [1, 3, 5]
        message_a = convert.results_to_pb(results_a, 0, blocks=True)
        message_b = convert.results_to_pb(results_b, 0, blocks=True)
        await batcher.close()
        return message_a, message_b

    message_a, message_b = asyncio.run(body())
    # One block per gateway, holding only its own rows and the outputs its requests asked.
    [block_a] = message_a.blocks
    assert list(block_a.request_ids) == [1, 3, 5] and list(block_a.rows) == [1, 1, 2]
    assert {t.name: list(t.shape) for t in block_a.outputs} == {
        "logits": [4, 64], "predictions": [4]}
    assert block_a.batch_size == 7 and not message_a.results
    got = asyncio.run(delivered(message_a, [1, 3, 5]))
    assert outputs(got[1]).keys() >= {"logits"}
    np.testing.assert_array_equal(outputs(got[1])["logits"], np.full((1, 64), 1, np.float32))
    np.testing.assert_array_equal(outputs(got[3])["logits"], np.full((1, 64), 3, np.float32))
    np.testing.assert_array_equal(outputs(got[3])["predictions"], [3])
    np.testing.assert_array_equal(outputs(got[5])["predictions"], [5, 5])
    assert got[5].batch_size == 7 and got[5].compute_ns == 1000

    # B: request 2's rows in a block; the withdrawn request 4 is a CANCELLED result.
    [block_b] = message_b.blocks
    assert list(block_b.request_ids) == [2] and list(block_b.rows) == [2]
    assert [t.name for t in block_b.outputs] == ["predictions"]  # only what 2 asked for
    [cancelled] = message_b.results
    assert cancelled.request_id == 4 and cancelled.code != 0
    got = asyncio.run(delivered(message_b, [2, 4]))
    np.testing.assert_array_equal(outputs(got[2])["predictions"], [2, 2])
    assert got[4].code == cancelled.code


def test_a_gateway_without_blocks_gets_one_result_per_request(models_dir):
    async def body():
        batcher, link = batcher_of(ModelRepository(models_dir), "digits")
        session = Session(batcher)
        session.submit(1, "digits", "2", rows_of(1, 2), ["predictions"], 0, 0)
        session.submit(2, "digits", "2", rows_of(2, 1), [], 0, 0)
        link.gate.set()
        results = []
        while len(results) < 2:
            results += (await drained(session))[0]
        await batcher.close()
        return convert.results_to_pb(results, 1, blocks=False)

    message = asyncio.run(body())
    assert not message.blocks and message.received == 1
    by_id = {r.request_id: r for r in message.results}
    assert [t.name for t in by_id[1].outputs] == ["predictions"]
    np.testing.assert_array_equal(from_pb(by_id[1].outputs[0]), [1, 1])
    np.testing.assert_array_equal(outputs(by_id[2])["logits"], np.full((1, 64), 2, np.float32))


@pytest.fixture
def unbatched_repo(tmp_path, models_dir):
    """digits with max_batch_size 0: a batch is one request, its shape the model's."""
    shutil.copytree(models_dir / "digits", tmp_path / "flat")
    config = json.loads((tmp_path / "flat" / "config.json").read_text())
    config.update(name="flat", max_batch_size=0)
    del config["batching"], config["classifier"]
    config["inputs"][0]["dims"] = [3, 64]
    config["outputs"] = config["outputs"][:1]
    config["outputs"][0]["dims"] = [3, 64]
    (tmp_path / "flat" / "config.json").write_text(json.dumps(config))
    return ModelRepository(tmp_path)


def test_a_model_that_does_not_batch_gets_its_outputs_whole(unbatched_repo):
    async def body():
        batcher, link = batcher_of(unbatched_repo, "flat")
        session = Session(batcher)
        session.submit(1, "flat", "2", rows_of(1, 3), [], 0, 0)
        session.submit(2, "flat", "2", rows_of(2, 3), ["logits"], 0, 0)
        link.gate.set()
        results = []
        while len(results) < 2:
            results += (await drained(session))[0]
        await batcher.close()
        assert [r.error for r in results] == [None, None]
        assert [b.rows for b in link.batches] == [1, 1]  # one request per batch
        return convert.results_to_pb(results, 0, blocks=True)

    message = asyncio.run(body())
    assert len(message.blocks) == 2 and all(not b.rows for b in message.blocks)
    got = asyncio.run(delivered(message, [1, 2]))
    np.testing.assert_array_equal(outputs(got[1])["logits"], np.full((3, 64), 1, np.float32))
    np.testing.assert_array_equal(outputs(got[2])["logits"], np.full((3, 64), 2, np.float32))
    assert [t.name for t in got[2].outputs] == ["logits"]


def test_a_block_that_does_not_add_up_fails_its_requests():
    block = batcher_pb2.ResultBlock(request_ids=[1, 2], rows=[1, 2], queue_ns=[0, 0])
    block.outputs.add(name="logits", datatype="FP32", shape=[4, 2], data=bytes(32))
    got = asyncio.run(delivered(batcher_pb2.InferResults(blocks=[block]), [1, 2]))
    assert all(isinstance(e, Unavailable) and "3 rows" in str(e) for e in got.values())
    short = batcher_pb2.ResultBlock(request_ids=[1, 2], rows=[1], queue_ns=[0, 0])
    got = asyncio.run(delivered(batcher_pb2.InferResults(blocks=[short]), [1, 2]))
    assert all(isinstance(e, Unavailable) for e in got.values())
