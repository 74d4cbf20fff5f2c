"""Spans through OpenTelemetry (only when its SDK is installed: it is not a dependency):
children of the request's traceparent, and the next hop's parent is the gateway's span."""

from __future__ import annotations

import time

import pytest

from meshserve.common import tracing

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is optional")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exported():
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer(provider.get_tracer("test"))
    yield exporter
    tracing.use_tracer(None)


def test_hop_spans_are_children_of_the_traceparent(exported):
    ctx = tracing.parse(f"00-{TRACE_ID}-{PARENT}-01")
    with tracing.span("gateway ModelInfer", ctx, model="digits") as hop:
        assert hop.trace_id == TRACE_ID and hop.span_id != PARENT and hop.sampled
        now = time.time_ns()
        tracing.record_span("batcher queue", tracing.parse(hop.traceparent), now - 1000, now,
                            model="digits")
    queue, gateway = exported.get_finished_spans()
    assert gateway.name == "gateway ModelInfer" and queue.name == "batcher queue"
    assert f"{gateway.context.trace_id:032x}" == TRACE_ID
    assert f"{gateway.parent.span_id:016x}" == PARENT
    assert f"{gateway.context.span_id:016x}" == hop.span_id
    assert queue.parent.span_id == gateway.context.span_id
    assert queue.end_time - queue.start_time == 1000
    assert gateway.attributes["model"] == "digits"


def test_unsampled_traceparents_record_no_spans(exported):
    ctx = tracing.parse(f"00-{TRACE_ID}-{PARENT}-00")
    with tracing.span("gateway ModelInfer", ctx):
        pass
    tracing.record_span("worker compute", ctx, 1, 2, error="boom")
    assert exported.get_finished_spans() == ()
