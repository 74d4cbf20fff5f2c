"""W3C traceparent parsing and formatting, sampling, and the per-request log helper."""

from __future__ import annotations

import logging
import random

import pytest

from meshserve.common import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


def test_valid_traceparent_round_trips():
    ctx = tracing.parse(VALID)
    assert ctx == tracing.TraceContext(TRACE_ID, SPAN_ID, 1)
    assert ctx.sampled and ctx.traceparent == VALID
    assert tracing.parse(VALID.encode()) == ctx  # metadata values may be bytes
    unsampled = tracing.parse(f"00-{TRACE_ID}-{SPAN_ID}-00")
    assert unsampled is not None and not unsampled.sampled
    # Other flag bits are kept; only bit 0 is "sampled".
    assert tracing.parse(f"00-{TRACE_ID}-{SPAN_ID}-03").sampled
    assert not tracing.parse(f"00-{TRACE_ID}-{SPAN_ID}-02").sampled


@pytest.mark.parametrize("header", [
    "",
    "garbage",
    f"00-{TRACE_ID}-{SPAN_ID}",                      # no flags
    f"00-{TRACE_ID}-{SPAN_ID}-01-extra",             # version 00 has exactly four fields
    f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",           # uppercase hex is invalid
    f"00-{TRACE_ID[:-1]}g-{SPAN_ID}-01",             # not hex
    f"00-{TRACE_ID}-{SPAN_ID[:-1]}-01",              # short parent id
    f"00_{TRACE_ID}_{SPAN_ID}_01",                   # wrong separators
    f"ff-{TRACE_ID}-{SPAN_ID}-01",                   # version ff is forbidden
    f"0g-{TRACE_ID}-{SPAN_ID}-01",                   # version not hex
    f"00-{'0' * 32}-{SPAN_ID}-01",                   # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",                  # all-zero parent id
    f"00-{TRACE_ID}-{SPAN_ID}-0x",                   # flags not hex
])
def test_invalid_traceparents_are_rejected(header):
    assert tracing.parse(header) is None


def test_future_versions_are_read_by_their_first_fields():
    assert tracing.parse(f"01-{TRACE_ID}-{SPAN_ID}-01-whatever") == tracing.TraceContext(
        TRACE_ID, SPAN_ID, 1)
    assert tracing.parse(f"01-{TRACE_ID}-{SPAN_ID}-01") is not None
    assert tracing.parse(f"01-{TRACE_ID}-{SPAN_ID}-01x") is None  # must continue with "-"


def test_new_contexts_and_incoming_metadata():
    ctx = tracing.new_context(sampled=True)
    assert tracing.parse(ctx.traceparent) == ctx and ctx.sampled
    assert len({tracing.new_context(False).trace_id for _ in range(100)}) == 100
    child = ctx.child()
    assert child.trace_id == ctx.trace_id and child.span_id != ctx.span_id
    # The client's traceparent wins over the sampling ratio.
    got = tracing.incoming([("x-route-key", "a"), ("traceparent", VALID)], sample_ratio=0.0)
    assert got.trace_id == TRACE_ID and got.sampled
    # Without one (or with an invalid one), a new trace, sampled at the ratio.
    assert not any(tracing.incoming([], 0.0).sampled for _ in range(50))
    assert all(tracing.incoming([("traceparent", "bad")], 1.0).sampled for _ in range(50))
    rng = random.Random(7)
    sampled = sum(tracing.incoming(None, 0.25, rng).sampled for _ in range(4000))
    assert 800 < sampled < 1200


def test_log_lines_only_for_sampled_requests_and_errors(caplog):
    logger = logging.getLogger("tests.tracing")
    sampled, unsampled = tracing.parse(VALID), tracing.parse(f"00-{'a' * 32}-{SPAN_ID}-00")
    with caplog.at_level(logging.INFO, logger="tests.tracing"):
        tracing.log_request(logger, sampled, "request %d done", 7)
        tracing.log_request(logger, unsampled, "request %d done", 8)
        tracing.log_request(logger, None, "request %d done", 9)
        tracing.log_request(logger, unsampled, "request %d failed", 10, error=True)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [(logging.INFO, f"trace={TRACE_ID} request 7 done"),
                     (logging.WARNING, f"trace={'a' * 32} request 10 failed")]


def test_the_current_context_is_scoped():
    ctx = tracing.parse(VALID)
    assert tracing.current_traceparent() == ""
    with tracing.use(ctx):
        assert tracing.current_traceparent() == VALID
    assert tracing.current_traceparent() == ""


def test_spans_are_off_without_an_endpoint():
    assert tracing.setup("test", "") is False
    with tracing.span("hop", tracing.parse(VALID)) as hop:
        assert hop == tracing.parse(VALID)  # passed on unchanged
    tracing.record_span("hop", tracing.parse(VALID), 1, 2)  # a no-op


def test_generated_code_lives_in_a_private_pool_beside_tritonclient():
    """Our messages (with the new trace fields) and tritonclient's copies of the same
    `inference` protos load in one process."""
    import tritonclient.grpc  # noqa: F401 - registers its descriptors in the default pool

    from meshserve.pb.inference import grpc_service_pb2
    from meshserve.pb.meshserve.v1 import batcher_pb2, cache_pb2, worker_pb2

    assert batcher_pb2.InferRequest(traceparent=VALID).traceparent == VALID
    assert list(worker_pb2.Batch(traceparents=[VALID, ""]).traceparents) == [VALID, ""]
    assert list(cache_pb2.LookupRequest(traceparents=[VALID]).traceparents) == [VALID]
    assert grpc_service_pb2.ModelInferRequest(model_name="digits").model_name == "digits"
