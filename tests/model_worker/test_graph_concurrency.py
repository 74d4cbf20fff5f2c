"""The bucket runner's concurrency rules, on CPU with the same code the CUDA path runs
(static buffers; graphs replace the forward on the static inputs there): batches of
different buckets run at once, two batches of one bucket never overlap, and a bucket
whose graph capture fails runs eagerly and says so."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from meshserve.model_worker.cuda_graphs import BucketRunner, InputSpec

SPEC = [InputSpec("x", torch.float32, (4,))]
BUCKETS = (1, 2, 4, 8)


def _run_all(runner: BucketRunner, batches: list[torch.Tensor]) -> list:
    results: list = [None] * len(batches)
    errors: list[BaseException] = []

    def one(i):
        try:
            results[i] = runner.run([batches[i]])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_batches_of_different_buckets_run_at_once():
    # Each forward waits until the other bucket's forward has started: with one lock for
    # the whole runner this could never pass (the barrier would break).
    barrier = threading.Barrier(2, timeout=60)

    def forward(x):
        barrier.wait()
        return (x * 2,)

    runner = BucketRunner(forward, SPEC, BUCKETS, "cpu", static_buffers=True)
    (a,), (b,) = [out for out, _ in _run_all(runner, [torch.ones(1, 4), torch.ones(3, 4)])]
    assert torch.equal(a, torch.full((1, 4), 2.0)) and torch.equal(b, torch.full((3, 4), 2.0))


def test_two_batches_of_one_bucket_never_overlap_and_keep_their_rows():
    active: Counter = Counter()
    most: Counter = Counter()
    lock = threading.Lock()
    entered = threading.Event()

    def forward(x):
        size = x.shape[0]
        with lock:
            active[size] += 1
            most[size] = max(most[size], active[size])
        entered.set()
        time.sleep(0.002)  # hands the GIL to the other threads: overlap shows if allowed
        out = x + 0.5  # allocates, like any layer; the static input stays intact
        with lock:
            active[size] -= 1
        return (out,)

    runner = BucketRunner(forward, SPEC, BUCKETS, "cpu", static_buffers=True)
    # 3 and 4 rows share bucket 4; 5..8 share bucket 8. Each batch holds its own values.
    batches = [torch.full((rows, 4), float(i)) for i, rows in enumerate([3, 4, 5, 8] * 16)]
    results = _run_all(runner, batches)
    assert entered.is_set()
    assert set(most) == {4, 8} and max(most.values()) == 1
    for x, ((out,), executed) in zip(batches, results, strict=True):
        assert executed == (4 if x.shape[0] <= 4 else 8)
        assert torch.equal(out, x + 0.5)


def test_a_bucket_whose_capture_fails_runs_eagerly_and_is_listed():
    runner = BucketRunner(lambda x: (x * 3,), SPEC, BUCKETS, "cpu", static_buffers=True)
    # As on CUDA: graphs wanted; here every capture but batch size 2's "fails".
    runner.use_graphs = True
    captured = []

    def capture(bucket):
        if bucket.size != 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(bucket.size)

    runner._capture = capture
    runner.warmup()
    assert captured == [2]
    assert set(runner.eager_buckets) == {1, 4, 8}
    assert "operation not permitted" in runner.eager_buckets[4]
    (out,), executed = runner.run([torch.ones(3, 4)])
    assert executed == 4 and torch.equal(out, torch.full((3, 4), 3.0))


@pytest.mark.cuda
def test_each_bucket_captures_into_its_own_pool_and_replays_concurrently():
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    net = net.cuda().eval()
    runner = BucketRunner(lambda x: (net(x),), SPEC, BUCKETS, "cuda", static_buffers=True,
                          use_graphs=True)
    runner.warmup()
    assert runner.graph_buckets == BUCKETS and not runner.eager_buckets
    pools = [runner._buckets[s].pool for s in BUCKETS]
    assert len(set(pools)) == len(BUCKETS)
    torch.manual_seed(0)
    batches = [torch.rand(rows, 4) for rows in [1, 2, 3, 5, 8, 7, 4, 1] * 32]
    results = _run_all(runner, batches)
    with torch.inference_mode():
        for x, ((out,), _executed) in zip(batches, results, strict=True):
            torch.testing.assert_close(out, net(x.cuda()).cpu())
