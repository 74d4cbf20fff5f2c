"""How many batches the batcher keeps in flight on a worker."""

from meshserve.batcher.workers import Worker, WorkerReport


class Link:
    address = "w:1"


def report(device: str) -> WorkerReport:
    return WorkerReport("w", device, (), 0, 0, 8, 0)


def test_default_is_one_on_cpu_and_two_on_gpu():
    cpu, gpu = Worker(Link(), 0), Worker(Link(), 0)
    cpu.report, gpu.report = report("cpu"), report("cuda:0")
    assert (cpu.slots, gpu.slots) == (1, 2)
    cpu.outstanding = 1
    assert cpu.free_slots == 0


def test_a_configured_value_wins():
    w = Worker(Link(), 3)
    w.report = report("cpu")
    assert w.slots == 3 and w.free_slots == 3
