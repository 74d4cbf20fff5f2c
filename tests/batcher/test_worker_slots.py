"""How many batches the batcher keeps in flight on a worker."""

from meshserve.batcher.workers import HEAVY_BATCH_S, PooledWorker, WorkerReport

KEY = ("digits", "2")


class Link:
    address = "w:1"


def worker(device: str, max_in_flight: int = 0) -> PooledWorker:
    w = PooledWorker(Link(), max_in_flight)
    w.report = WorkerReport("w", device, (), 0, 0, 8, 0)
    return w


def test_a_gpu_worker_keeps_two_batches_in_flight():
    assert worker("cuda:0").slots(KEY) == 2


def test_a_cpu_worker_keeps_one_until_batches_are_heavy():
    w = worker("cpu")
    assert w.slots(KEY) == 1
    w.profile(KEY).observe(8, HEAVY_BATCH_S / 10)
    assert w.slots(KEY) == 1
    w.outstanding = 1
    assert w.free_slots(KEY) == 0
    w.profile(KEY).observe(32, HEAVY_BATCH_S * 5)
    assert w.slots(KEY) == 2 and w.free_slots(KEY) == 1
    assert w.slots(("other", "1")) == 1  # per model


def test_a_configured_value_wins():
    w = worker("cpu", max_in_flight=3)
    assert w.slots(KEY) == 3 and w.free_slots(KEY) == 3
