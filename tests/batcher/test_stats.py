"""Statistics and Prometheus metrics of the batcher."""

from prometheus_client import generate_latest

from meshserve.batcher.stats import Statistics


def test_counts_per_model_version_and_batch_size():
    s = Statistics()
    s.record_batch("m", "1", rows=3, executed_batch_size=4, compute_ns=1000)
    s.record_batch("m", "1", rows=4, executed_batch_size=4, compute_ns=3000)
    for _ in range(7):
        s.record_request("m", "1", "OK", total_ns=10, queue_ns=5)
    s.record_request("m", "1", "DEADLINE_EXCEEDED", total_ns=20, queue_ns=None)
    s.record_request("m", "2", "RESOURCE_EXHAUSTED", total_ns=0, queue_ns=None)
    [m1] = s.snapshot("m", "1")
    assert (m1.inference_count, m1.execution_count) == (7, 2)
    assert (m1.success.count, m1.success.ns) == (7, 70)
    assert (m1.fail.count, m1.fail.ns) == (1, 20)
    assert (m1.queue.count, m1.queue.ns) == (7, 35)
    assert (m1.compute_infer.count, m1.compute_infer.ns) == (2, 4000)
    assert {k: (v.count, v.ns) for k, v in m1.batch_stats.items()} == {4: (2, 4000)}
    assert m1.last_inference_ms > 0
    assert [x.version for x in s.snapshot("m")] == ["1", "2"]

    s.set_depth("m", "1", 5)
    text = generate_latest(s.registry).decode()
    assert 'meshserve_batcher_queue_depth{model="m",version="1"} 5.0' in text
    assert 'meshserve_batcher_requests_total{model="m",outcome="ok"} 7.0' in text
    assert 'meshserve_batcher_requests_total{model="m",outcome="deadline"} 1.0' in text
    assert 'meshserve_batcher_requests_total{model="m",outcome="overloaded"} 1.0' in text
    assert 'meshserve_batcher_batch_size_count{model="m"} 2.0' in text
    assert 'meshserve_batcher_queue_wait_seconds_count{model="m"} 7.0' in text
